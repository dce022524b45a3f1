"""Preference training (``rl:``) with ILA.

End to end through the real ``python -m axolotl.cli.train`` on the tiny Llama
and tiny preference data (``tiny.build_preference_data``): every method trains
adapters on exactly the kept modules of a cached ranking, full fine-tuning
freezes the policy's dropped weights, a plugin that changes the adapters stops
the run, and a search on DPO data writes a ranking made with the DPO loss and
trains its kept set, continuing from the warm-up. Fast unit tests check the
reference model checks, the recorded loss and the refusals.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    KTO_TYPE,
    PAIR_TYPES,
    adapter_modules,
    build_preference_data,
    load_tensors,
    make_config,
    read_json,
    run_train,
    write_config,
)

from axolotl_ila.application import ApplicationError
from axolotl_ila.preference import PREFERENCE_METHODS, loss_identity, unsupported_message, verify_reference
from axolotl_ila.ranking.file import Ranking, load_ranking, save_ranking
from axolotl_ila.search.settings import SearchError, check_search_config
from axolotl_ila.selection import Selection


def preference_config(workspace, data, out: Path, rl: str, adapter: str | None = "lora", **overrides):
    """A config for ``rl`` on the tiny preference data, in a format axolotl 0.19
    ships a prompt strategy for."""
    dataset = {"path": str(data["kto" if rl == "kto" else "pairs"]), "ds_type": "json", "type": KTO_TYPE if rl == "kto" else PAIR_TYPES[rl]}
    extra = {
        "kto": {"remove_unused_columns": False},  # axolotl requires it for KTO
        "simpo": {"simpo_gamma": 0.5},  # TRL's SimPO loss needs a margin; axolotl has no default
        "orpo": {"chat_template": "chatml"},  # ORPO's prompt strategy renders with the chat template
    }.get(rl, {})
    settings = {"max_steps": 1, "dataset_num_proc": 1, **extra, **overrides}
    return make_config(workspace, out, adapter=adapter, rl=rl, datasets=[dataset], **settings)


@pytest.fixture(scope="module")
def preference(tiny_llama, tmp_path_factory):
    """Tiny preference data, and a cached ranking of the tiny Llama in a shuffled
    order (so that the dropped modules are spread over blocks and module types)."""
    from axolotl.cli.config import load_cfg as axolotl_load_cfg

    from axolotl_ila.candidates import describe_model

    root = tmp_path_factory.mktemp("preference")
    data = build_preference_data(root, rows=32)
    saved = dict(os.environ)
    try:
        cfg = axolotl_load_cfg(str(write_config(make_config(tiny_llama, root, ila_ranking=str(root / "r.json")), root / "describe.yml")))
        info = describe_model(cfg)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    order = list(info.candidates)
    random.Random(0).shuffle(order)
    ranking = Ranking.from_scores({name: -float(i) for i, name in enumerate(order)}, model=info.model_section, search={"method": "test"})
    path = root / "ranking.json"
    save_ranking(ranking, path)
    return {"data": data, "ranking": path, "kept": set(order[:21]), "dropped": set(order[21:])}


def nonzero_lora_b(run_dir: Path) -> set[str]:
    """Modules whose saved LoRA B moved away from its zero start (they trained)."""
    tensors = load_tensors(run_dir / "adapter_model.safetensors")
    return {key.split(".lora_B.")[0].removeprefix("base_model.model.") for key, t in tensors.items() if ".lora_B." in key and t.abs().sum() > 0}


# -- end to end ----------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("rl", PREFERENCE_METHODS)
def test_each_method_trains_adapters_on_exactly_the_kept_modules(rl, tiny_llama, preference, tmp_path):
    cfg = preference_config(tiny_llama, preference["data"], tmp_path, rl, ila_ranking=str(preference["ranking"]), ila_search="never")
    result = run_train(write_config(cfg, tmp_path / "config.yml"))
    run_dir = tmp_path / "run"
    assert adapter_modules(run_dir) == preference["kept"]
    assert nonzero_lora_b(run_dir) == preference["kept"]
    assert set(read_json(run_dir / "ila_selection.json")["dropped"]) == preference["dropped"]
    reference = "the policy with its adapters disabled" if rl in ("dpo", "ipo", "kto") else f"none ({rl} has no reference model)"
    assert f"ILA: rl: {rl} trains LoRA on the 21 kept modules; reference: {reference}" in result.stdout + result.stderr


@pytest.mark.e2e
def test_full_finetuning_with_dpo_freezes_the_dropped_weights_of_the_policy_only(tiny_llama, preference, tmp_path):
    cfg = preference_config(tiny_llama, preference["data"], tmp_path, "dpo", adapter=None, ila_ranking=str(preference["ranking"]), ila_search="never", learning_rate=0.01)
    result = run_train(write_config(cfg, tmp_path / "config.yml"))
    base = load_tensors(tiny_llama["model"] / "model.safetensors")
    tuned = load_tensors(tmp_path / "run" / "model.safetensors")
    for name in preference["dropped"]:
        assert torch.equal(tuned[f"{name}.weight"], base[f"{name}.weight"]), f"{name} changed but was dropped"
    for name in preference["kept"]:
        assert not torch.equal(tuned[f"{name}.weight"], base[f"{name}.weight"]), f"{name} did not train"
    # axolotl loads a separate reference model for full fine-tuning; ILA left it alone.
    assert "reference: a separate copy of the base model, without adapters" in result.stdout + result.stderr


OVERRIDING_PLUGIN = '''
from axolotl.integrations.base import BasePlugin


class ExcludeNothingPlugin(BasePlugin):
    """Another plugin that rewrites the LoRA excludes after ILA set them."""

    def pre_lora_load(self, cfg, model):
        cfg.lora_exclude_modules = None
'''


@pytest.mark.e2e
def test_a_plugin_that_changes_the_adapters_stops_a_dpo_run(tiny_llama, preference, tmp_path):
    # ``python -m`` runs with the config's folder on sys.path, so axolotl can import the plugin from there.
    (tmp_path / "exclude_nothing.py").write_text(OVERRIDING_PLUGIN, encoding="utf-8")
    cfg = preference_config(
        tiny_llama,
        preference["data"],
        tmp_path,
        "dpo",
        ila_ranking=str(preference["ranking"]),
        ila_search="never",
        plugins=["axolotl_ila.ILAPlugin", "exclude_nothing.ExcludeNothingPlugin"],
    )
    result = run_train(write_config(cfg, tmp_path / "config.yml"), check=False)
    assert result.returncode != 0
    assert "ILA: the LoRA-adapted modules are not the selection: 0 selected modules lack it (), 7 unselected have it" in result.stderr
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


@pytest.mark.e2e
def test_a_search_on_dpo_data_writes_a_ranking_made_with_the_dpo_loss_and_trains_its_kept_set(tiny_llama, preference, tmp_path):
    ranking_path = tmp_path / "rankings" / "tiny-dpo.json"
    cfg = preference_config(tiny_llama, preference["data"], tmp_path, "dpo", ila_ranking=str(ranking_path), max_steps=8, ila_warmup_max_steps=4, ila_gate_steps=4, rl_beta=0.2)
    result = run_train(write_config(cfg, tmp_path / "config.yml"))
    logs = result.stdout + result.stderr
    ranking = load_ranking(ranking_path)
    assert ranking.search["loss"] == {"method": "dpo", "beta": 0.2, "loss_type": ["sigmoid"], "label_smoothing": 0.0}
    assert "on the dpo loss" in logs
    run_dir = tmp_path / "run"
    assert adapter_modules(run_dir) == set(ranking.names[:21])
    # One run: the training continued from the warm-up's checkpoint to max_steps.
    warmup_steps = ranking.search["stage1"]["steps"]
    assert ranking.search["stage1"]["continued_by_training"] is True
    assert f"the training continues from the warm-up's step {warmup_steps}" in logs
    # Without checkpoints (save_strategy: "no") the warm-up's checkpoint is
    # removed once the training has finished from it.
    checkpoint = run_dir / f"checkpoint-{warmup_steps}"
    assert f"removed the warm-up's checkpoint {checkpoint}" in logs
    assert not checkpoint.exists()
    assert "Training completed!" in logs


# -- units ---------------------------------------------------------------------------


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)


SELECTION = Selection(kept=("a",), dropped=("b",), strategy="ila", mode="drop", fraction=0.5)


def lora_on(model: torch.nn.Module, targets: list[str]) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=2, target_modules=targets))


def fake_trainer(policy, ref=None):
    return SimpleNamespace(model=policy, ref_model=ref, accelerator=None)


def test_the_reference_is_described_by_what_the_trainer_holds():
    policy = lora_on(TwoLinears(), ["a"])
    assert verify_reference(fake_trainer(policy), SELECTION, "dpo") == "the policy with its adapters disabled (the base model)"
    assert verify_reference(fake_trainer(policy), SELECTION, "orpo") == "none (orpo has no reference model)"
    assert verify_reference(fake_trainer(TwoLinears(), TwoLinears()), SELECTION, "dpo") == "a separate copy of the base model, without adapters"
    frozen_whole = TwoLinears().requires_grad_(False)  # TRL may freeze the reference whole
    assert verify_reference(fake_trainer(TwoLinears(), frozen_whole), SELECTION, "dpo").startswith("a separate copy")


def test_a_reference_with_adapters_is_refused():
    with pytest.raises(ApplicationError, match=r"reference model carries LoRA on 1 modules \(a\)"):
        verify_reference(fake_trainer(TwoLinears(), lora_on(TwoLinears(), ["a"])), SELECTION, "dpo")


def test_a_reference_sharing_weights_with_the_policy_is_refused():
    policy = TwoLinears()
    ref = TwoLinears()
    ref.b = policy.b
    with pytest.raises(ApplicationError, match=r"shares 2 weights with the policy \(e\.g\. b\.weight\)"):
        verify_reference(fake_trainer(policy, ref), SELECTION, "dpo")


def test_a_reference_with_the_selection_applied_is_refused():
    ref = TwoLinears()
    ref.b.requires_grad_(False)
    with pytest.raises(ApplicationError, match=r"1 of the selection's candidate modules frozen and the others not \(e\.g\. b\)"):
        verify_reference(fake_trainer(TwoLinears(), ref), SELECTION, "dpo")


def test_the_recorded_loss_names_the_method_and_its_coefficients():
    args = SimpleNamespace(beta=0.1, loss_type=["sigmoid"], label_smoothing=0.0, output_dir="x")
    assert loss_identity({"rl": "dpo"}, SimpleNamespace(args=args)) == {"method": "dpo", "beta": 0.1, "loss_type": ["sigmoid"], "label_smoothing": 0.0}
    simpo = SimpleNamespace(beta=2.0, loss_type="simpo", simpo_gamma=0.5, cpo_alpha=0.0)
    assert loss_identity({"rl": "simpo"}, SimpleNamespace(args=simpo)) == {"method": "simpo", "beta": 2.0, "loss_type": "simpo", "simpo_gamma": 0.5, "cpo_alpha": 0.0}
    assert loss_identity({"rl": None}, SimpleNamespace(args=args)) == {"method": "sft"}


@pytest.mark.parametrize("rl", PREFERENCE_METHODS)
def test_every_preference_method_may_search(rl):
    check_search_config(SimpleNamespace(rl=rl, peft_use_dora=False, lora_model_dir=None, get=lambda k, d=None: {"rl": rl}.get(k, d)))
    assert unsupported_message(rl) is None


@pytest.mark.parametrize("rl", ["grpo", "gdpo", "ebft"])
def test_online_methods_are_refused_with_what_to_do(rl):
    message = unsupported_message(rl)
    assert f"rl: {rl} generates completions while it trains" in message and "dpo, ipo, kto, orpo, simpo" in message
    with pytest.raises(SearchError, match=f"rl: {rl} generates completions"):
        check_search_config(SimpleNamespace(rl=rl, peft_use_dora=False, lora_model_dir=None, get=lambda k, d=None: {"rl": rl}.get(k, d)))


def test_grpo_is_refused_at_config_load(refused):
    refused("rl: grpo generates completions while it trains", rl="grpo")


def test_show_prints_the_loss_a_ranking_was_searched_with(tmp_path, capsys):
    from axolotl_ila.cli.commands import main

    model = {"fingerprint": "sha256:" + "d" * 64, "base_model": "tiny"}
    search = {"method": "ila", "loss": {"method": "dpo", "beta": 0.1, "loss_type": ["sigmoid"]}}
    path = tmp_path / "r.json"
    save_ranking(Ranking.from_scores({"a": 2.0, "b": 1.0, "c": 0.0, "d": -1.0}, model=model, search=search), path)
    assert main(["show", str(path)]) == 0
    assert "loss      dpo (beta 0.1, loss_type ['sigmoid'])" in capsys.readouterr().out
