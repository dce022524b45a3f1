"""Candidates follow the user's LoRA targets; PEFT gets the right excludes; the
verification catches a model that does not carry the selection."""

from __future__ import annotations

import pytest
import torch
from axolotl.utils.dict import DictDefault
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from axolotl_ila.application import (
    ApplicationError,
    adapted_modules,
    freeze_dropped,
    peft_exclude_modules,
    verify_adapters,
    verify_trainable,
)
from axolotl_ila.architecture import block_index, fingerprint, linear_modules, module_kind
from axolotl_ila.candidates import skeleton_model, target_candidates
from axolotl_ila.selection import Selection


@pytest.fixture(scope="module")
def model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(str(tiny_llama["model"]))


def cfg(**keys) -> DictDefault:
    return DictDefault({"adapter": "lora", **keys})


def names(model, **keys) -> list[str]:
    return [m.name for m in target_candidates(model, cfg(**keys))]


def test_target_linear_means_every_linear_module_but_the_head(model):
    found = names(model, lora_target_linear=True)
    assert len(found) == 28 and "lm_head" not in found


def test_explicit_targets_and_layers_to_transform(model):
    assert {module_kind(n) for n in names(model, lora_target_modules=["q_proj", "v_proj"])} == {"self_attn.q_proj", "self_attn.v_proj"}
    found = names(model, lora_target_modules=["q_proj", "v_proj"], peft_layers_to_transform=[1, 2])
    assert sorted({block_index(n) for n in found}) == [1, 2] and len(found) == 4


def test_a_string_target_is_a_regex_as_in_peft(model):
    found = names(model, lora_target_modules=r".*layers\.0\.mlp\..*")
    assert found == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]


def test_user_excludes_and_modules_to_save_are_respected(model):
    found = names(model, lora_target_linear=True, lora_exclude_modules=["model.layers.0.mlp.up_proj"])
    assert len(found) == 27 and "model.layers.0.mlp.up_proj" not in found


def test_full_finetuning_candidates_are_all_linear_modules(model):
    assert len([m.name for m in target_candidates(model, DictDefault({"adapter": None}))]) == 28


def test_skeleton_has_the_real_models_fingerprint(tiny_llama, model):
    skeleton = skeleton_model(DictDefault({"base_model": str(tiny_llama["model"]), "base_model_config": str(tiny_llama["model"])}))
    assert next(skeleton.parameters()).device.type == "meta"
    assert fingerprint(linear_modules(skeleton)) == fingerprint(linear_modules(model))


def test_peft_exclude_modules_merges_with_the_users_own():
    dropped = ("model.layers.0.mlp.up_proj",)
    assert peft_exclude_modules(None, dropped) == ["model.layers.0.mlp.up_proj"]
    assert peft_exclude_modules(["lm_head"], dropped) == ["lm_head", "model.layers.0.mlp.up_proj"]
    regex = peft_exclude_modules(r".*\.k_proj", dropped)
    import re

    assert re.fullmatch(regex, "model.layers.3.self_attn.k_proj")
    assert re.fullmatch(regex, "model.layers.0.mlp.up_proj")
    assert not re.fullmatch(regex, "model.layers.1.mlp.up_proj")  # exact names, not suffixes of other blocks


def _selection(all_names: list[str], dropped: list[str]) -> Selection:
    return Selection(tuple(n for n in all_names if n not in dropped), tuple(dropped), "first", "drop", 0.25)


def test_peft_excludes_exactly_the_dropped_modules_and_verification_passes(model, tiny_llama):
    fresh = AutoModelForCausalLM.from_pretrained(str(tiny_llama["model"]))
    all_names = names(fresh, lora_target_linear=True)
    dropped = [n for n in all_names if block_index(n) == 1]  # "model.layers.1.*" must not hit layers.11 etc.
    targets = sorted({n.rsplit(".", 1)[-1] for n in all_names})
    peft_model = get_peft_model(fresh, LoraConfig(r=2, target_modules=targets, exclude_modules=peft_exclude_modules(None, tuple(dropped))))
    selection = _selection(all_names, dropped)
    assert adapted_modules(peft_model) == set(selection.kept)
    verify_adapters(peft_model, selection)
    with pytest.raises(ApplicationError, match=r"1 selected modules lack it"):
        verify_adapters(peft_model, _selection(all_names, dropped[:-1]))


def test_full_finetuning_freezes_and_verifies(tiny_llama):
    fresh = AutoModelForCausalLM.from_pretrained(str(tiny_llama["model"]))
    all_names = names(fresh, lora_target_linear=True)
    selection = _selection(all_names, all_names[:7])
    freeze_dropped(fresh, selection)
    verify_trainable(fresh, selection)
    assert fresh.get_submodule(all_names[0]).weight.requires_grad is False
    assert fresh.model.embed_tokens.weight.requires_grad is True
    fresh.get_submodule(all_names[0]).weight.requires_grad_(True)  # something re-enabled it
    with pytest.raises(ApplicationError, match=r"the trainable modules are not the selection"):
        verify_trainable(fresh, selection)
    assert torch.is_grad_enabled()
