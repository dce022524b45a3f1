"""Model families, piece by piece: expert parameters as units (candidates,
naming, update norms, gates), Conv1D as a linear module, fused groups that a
model does not have, and how show and the heatmap explain what they draw."""

from __future__ import annotations

import hashlib

import pytest
import torch
from axolotl.utils.dict import DictDefault
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, Qwen3MoeConfig

from axolotl_ila.application import lora_layers
from axolotl_ila.architecture import fingerprint, linear_modules, model_units
from axolotl_ila.candidates import skeleton_model, target_candidates
from axolotl_ila.cli.commands import main
from axolotl_ila.plan import kernel_warnings
from axolotl_ila.ranking.file import Ranking, save_ranking
from axolotl_ila.report.heatmap import figure_size, layout
from axolotl_ila.search.lora_update import install_gate, update_norm
from axolotl_ila.selection import SelectionError, present_groups, select

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def moe_model(seed: int = 0):
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=64, tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config)


def cfg(**keys) -> DictDefault:
    return DictDefault({"adapter": "lora", **keys})


def test_expert_parameters_are_units_and_candidates_follow_target_parameters():
    model = moe_model()
    experts = [u for u in model_units(model) if u.experts is not None]
    assert [u.name for u in experts[:2]] == ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    assert (experts[1].experts, experts[1].out_features, experts[1].in_features) == (4, 32, 16)
    names = [u.name for u in target_candidates(model, cfg(lora_target_modules=["q_proj"], lora_target_parameters=["mlp.experts.down_proj"]))]
    assert names == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.experts.down_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.experts.down_proj",
    ]
    # Without lora_target_parameters the experts are no candidates (as PEFT adapts none).
    assert not any("experts" in u.name for u in target_candidates(model, cfg(lora_target_linear=True)))


def test_mixtral_experts_are_units_and_its_router_is_not():
    from transformers import MixtralConfig

    config = MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    units = {u.name: u.experts for u in model_units(AutoModelForCausalLM.from_config(config))}
    assert units["model.layers.0.mlp.experts.gate_up_proj"] == 4 and units["model.layers.0.mlp.experts.down_proj"] == 4
    assert not any(name.startswith("model.layers.0.mlp.gate") for name in units)  # the router: 2-D, not nn.Linear


def test_target_parameters_that_are_not_expert_parameters_are_refused_by_name():
    model = moe_model()
    with pytest.raises(SelectionError, match=r"'mlp.gate.weight' matches model.layers.0.mlp.gate.weight, which is not a 3-D expert"):
        target_candidates(model, cfg(lora_target_linear=True, lora_target_parameters=["mlp.gate.weight"]))
    with pytest.raises(SelectionError, match=r"'mlp.experts.w1' matches no parameter"):
        target_candidates(model, cfg(lora_target_linear=True, lora_target_parameters=["mlp.experts.w1"]))


def test_fingerprint_of_a_model_without_experts_is_unchanged(tiny_llama):
    model = skeleton_model(DictDefault({"base_model": str(tiny_llama["model"])}))
    digest = hashlib.sha256()
    for m in sorted(linear_modules(model), key=lambda m: m.name):
        digest.update(f"{m.name}:{m.in_features}x{m.out_features}\n".encode())  # the format rankings were made with
    assert fingerprint(model_units(model)) == "sha256:" + digest.hexdigest()
    moe = moe_model()
    assert fingerprint(model_units(moe)) != fingerprint(linear_modules(moe))  # experts count


def test_gpt2_conv1d_projections_are_linear_modules():
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64))
    units = {u.name: (u.in_features, u.out_features) for u in linear_modules(model)}
    assert units["transformer.h.0.attn.c_attn"] == (32, 96) and units["transformer.h.0.mlp.c_fc"] == (32, 128)
    found = [u.name for u in target_candidates(model, cfg(lora_target_linear=True, lora_target_modules=["c_attn", "c_fc"]))]
    assert found == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]


def peft_moe():
    model = get_peft_model(moe_model(), LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERTS))
    torch.manual_seed(1)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    return model


def test_lora_layers_name_nested_expert_wrappers_by_parameter():
    names = set(lora_layers(peft_moe()))
    assert names == {f"model.layers.{b}.{kind}" for b in range(2) for kind in ["self_attn.q_proj", *EXPERTS]}


def test_update_norm_is_the_norm_of_peft_delta_weight_also_for_experts():
    for name, layer in lora_layers(peft_moe()).items():
        delta = layer.get_delta_weight("default").float()
        assert update_norm(layer) == pytest.approx(float(delta.detach().norm()), rel=1e-4), name


def test_a_gate_scales_the_expert_update_and_learns_from_it():
    model = peft_moe()
    model.eval()
    ids = torch.randint(0, 64, (2, 8))
    layers = {n: l for n, l in lora_layers(model).items() if "experts" in n}
    with model.disable_adapter():
        base = model(input_ids=ids).logits
    with torch.no_grad():
        full = model(input_ids=ids).logits
    score = torch.tensor(-30.0, requires_grad=True)  # gate ~ 0: the experts' LoRA is off
    handles = [install_gate(layer, lambda: torch.sigmoid(score)) for layer in layers.values()]
    try:
        closed = model(input_ids=ids).logits
        closed.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    restored = model(input_ids=ids).logits
    # Only q_proj's LoRA remains: not the base output, not the full one.
    assert not torch.allclose(closed, full, atol=1e-5) and not torch.allclose(closed, base, atol=1e-5)
    assert torch.allclose(restored, full, atol=1e-6)
    score2 = torch.tensor(0.0, requires_grad=True)
    handles = [install_gate(layer, lambda: torch.sigmoid(score2)) for layer in layers.values()]
    model(input_ids=ids).logits.pow(2).mean().backward()
    for handle in handles:
        handle.remove()
    assert score2.grad is not None and score2.grad != 0


def test_a_gate_of_g_gives_exactly_the_expert_update_scaled_by_g():
    """Whichever way the installed peft computes the experts' update (peft 0.20:
    get_delta_weight; 0.21: the low-rank factors of get_delta_factors, folded
    into the parameter), the gate scales that update and only that."""
    model = peft_moe()
    model.eval()
    ids = torch.randint(0, 64, (2, 8))
    layers = {n: l for n, l in lora_layers(model).items() if "experts" in n}
    g = 0.3
    handles = [install_gate(layer, lambda: torch.tensor(g)) for layer in layers.values()]
    try:
        with torch.no_grad():
            gated = model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].weight.mul_(g)
        scaled = model(input_ids=ids).logits
    assert torch.allclose(gated, scaled, atol=1e-5)
    assert all("get_delta_weight" not in vars(layer) and "get_delta_factors" not in vars(layer) for layer in layers.values())


PHI3 = [f"model.layers.{b}.{k}" for b in range(2) for k in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
LLAMA = [f"model.layers.{b}.{k}" for b in range(2) for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def ranking_of(names: list[str], num_linear: int) -> Ranking:
    scores = {n: float(len(names) - i) for i, n in enumerate(names)}
    return Ranking.from_scores(scores, model={"base_model": "tiny", "model_type": "x", "fingerprint": "sha256:" + "a" * 64, "num_linear_modules": num_linear}, search={})


def test_fused_groups_apply_only_where_a_block_has_them():
    assert present_groups(PHI3, ("qkv", "mlp")) == ()
    assert present_groups(LLAMA, ("qkv", "mlp")) == ("qkv", "mlp")
    assert select(PHI3, PHI3, "ila", groups=("qkv", "mlp")).groups == ()
    selection = select(PHI3, PHI3, "ila", groups=("qkv", "mlp"))
    (warning,) = kernel_warnings(DictDefault({"adapter": "lora", "ila_fused_groups": True}), selection)
    assert "ila_fused_groups: true, but no block has q_proj/k_proj/v_proj or gate_proj/up_proj/down_proj as separate modules" in warning


def test_show_fused_groups_on_phi3_says_nothing_is_grouped(tmp_path, capsys):
    path = tmp_path / "phi3.json"
    save_ranking(ranking_of(PHI3, 9), path)
    assert main(["show", str(path), "--fused-groups"]) == 0
    out = capsys.readouterr().out
    assert "(whole" not in out
    assert "--fused-groups: no block has q_proj/k_proj/v_proj or gate_proj/up_proj/down_proj as separate modules" in out


def test_show_says_why_fewer_modules_are_ranked_than_the_model_has(tmp_path, capsys):
    path = tmp_path / "llama.json"
    save_ranking(ranking_of(LLAMA, 15), path)
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "14 of the model's 15 modules ranked: those the search's LoRA targeted; lora_target_linear leaves out the output head, lm_head" in out


def test_heatmap_gives_a_ranked_head_its_own_row():
    names = LLAMA + ["lm_head"]
    rows, columns, cells = layout(names)
    assert rows[-1] == "lm_head" and columns[-1] == "head"
    assert cells["lm_head"] == (len(rows) - 1, len(columns) - 1)
    assert all(cell[0] != cells["lm_head"][0] for name, cell in cells.items() if name != "lm_head")
    assert figure_size(ranking_of(names, 15))[1] == pytest.approx(1.6 + 0.42 * 8)  # 7 types + lm_head
