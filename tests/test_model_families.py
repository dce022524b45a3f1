"""Model families beyond Llama: GPT-2's Conv1D projections, and a mixture of
experts whose experts are fused 3-D parameters adapted through
``lora_target_parameters``. End to end through ``axolotl.cli.train``: the
search ranks exactly what PEFT adapts, and training adapts exactly the kept set."""

from __future__ import annotations

import pytest
from helpers import adapter_modules, make_config, read_json, run_train, write_config

from axolotl_ila.ranking.file import load_ranking
from benchmarks.common.tiny_models import build_workspace

pytestmark = pytest.mark.e2e

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("gpt2"), "gpt2", layers=2, rows=64)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("moe"), "qwen3_moe", layers=2, rows=64)


def saved_units(run_dir, base_model) -> set[str]:
    """Unit names (modules and expert parameters) that carry LoRA once the saved
    adapter is loaded back onto the base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from axolotl_ila.application import lora_layers

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_model)), str(run_dir))
    return set(lora_layers(model))


def test_gpt2_conv1d_projections_are_searched_and_trained(tiny_gpt2, tmp_path):
    ranking_path = tmp_path / "gpt2.json"
    cfg = make_config(
        tiny_gpt2, tmp_path, ila_ranking=str(ranking_path), lora_target_modules=["c_attn", "c_proj", "c_fc"],
        max_steps=8, ila_gate_steps=4,
    )
    run_train(write_config(cfg, tmp_path / "config.yml"))
    ranking = load_ranking(ranking_path)
    assert len(ranking.names) == 8  # 2 blocks x c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in ranking.names} == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert adapter_modules(tmp_path / "run") == set(ranking.names[:6])  # drop 25% of 8


def test_nothing_targeted_names_the_patterns_that_matched_nothing(tiny_gpt2, tmp_path):
    cfg = make_config(tiny_gpt2, tmp_path, ila_ranking=str(tmp_path / "r.json"), lora_target_modules=["q_proj", "v_proj"])
    result = run_train(write_config(cfg, tmp_path / "config.yml"), check=False)
    logs = result.stdout + result.stderr
    assert result.returncode != 0
    assert "lora_target_modules entries q_proj, v_proj match no linear module" in logs
    assert "named c_attn, c_fc, c_proj, lm_head" in logs
    assert not (tmp_path / "prepared").exists()  # refused before the data loaded


def test_moe_expert_parameters_are_ranked_and_only_the_kept_ones_trained(tiny_moe, tmp_path):
    ranking_path = tmp_path / "moe.json"
    cfg = make_config(
        tiny_moe, tmp_path, ila_ranking=str(ranking_path), lora_target_parameters=EXPERTS,
        max_steps=8, ila_gate_steps=4,
    )
    run_train(write_config(cfg, tmp_path / "config.yml"))
    ranking = load_ranking(ranking_path)
    experts = {f"model.layers.{b}.{p}" for b in range(2) for p in EXPERTS}
    # 2 blocks x (q, k, v, o) + 2 expert parameters each; the router is not a linear module
    assert len(ranking.names) == 12 and experts <= set(ranking.names)
    assert ranking.model["num_expert_parameters"] == 4
    assert all(m.update_norm and m.update_norm > 0 for m in ranking.modules)  # experts' LoRA moved too
    kept = set(ranking.names[:9])  # drop 25% of 12
    assert experts & kept and experts - kept  # this seed keeps some expert parameters and drops others
    assert saved_units(tmp_path / "run", tiny_moe["model"]) == kept
    record = read_json(tmp_path / "run" / "ila_selection.json")
    assert set(record["kept"]) == kept
