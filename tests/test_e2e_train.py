"""End to end: the real ``python -m axolotl.cli.train`` on tiny local models.

Each test checks the outcome, not only that training ran: which modules have
saved adapter weights, which base weights changed, what was recorded.
"""

from __future__ import annotations

import pytest
from helpers import adapter_modules, load_tensors, make_config, read_json, run_python, run_train, write_config

from axolotl_ila.ranking.file import load_ranking
from axolotl_ila.selection import importance_order, select

pytestmark = pytest.mark.e2e


def test_search_runs_then_adapters_sit_exactly_on_the_selection(searched):
    ranking = load_ranking(searched["ranking"])
    assert len(ranking.modules) == 28  # 4 blocks x 7 linear modules, lm_head not targeted
    run_dir = searched["out"] / "run"
    record = read_json(run_dir / "ila_selection.json")
    expected_dropped = set(ranking.names[-7:])  # the least important 25%
    assert set(record["dropped"]) == expected_dropped
    assert adapter_modules(run_dir) == set(ranking.names[:21])
    assert record["ranking"]["fingerprint"] == ranking.fingerprint
    # The adapter's folder carries the ranking that chose its modules, and the record names it.
    assert record["ranking"]["copy"] == "ila_ranking.json"
    assert (run_dir / "ila_ranking.json").read_bytes() == searched["ranking"].read_bytes()
    assert "ILA search: warm-up" in searched["result"].stderr + searched["result"].stdout
    # At the defaults the warm-up runs its whole length (0.75 of max_steps 20),
    # and the gates run at least min(ila_gate_min_steps 64, ila_gate_steps 16).
    stage1, stage2 = ranking.search["stage1"], ranking.search["stage2"]
    assert stage1["early_stop"] is False and stage1["steps"] == stage1["max_steps"] == 15 and stage1["stop_reason"] == "cap"
    assert stage2["steps"] == 16
    # The search's scratch run leaves no checkpoints behind.
    assert not list((run_dir / ".ila_search").glob("checkpoint-*"))


def test_second_run_reuses_the_ranking_without_searching(searched, tiny_llama):
    out = searched["out"]
    before = searched["ranking"].read_bytes()
    cfg = {**searched["cfg"], "output_dir": str(out / "run2")}
    result = run_train(write_config(cfg, out / "config2.yml"))
    logs = result.stdout + result.stderr
    assert "ILA search: warm-up" not in logs
    assert searched["ranking"].read_bytes() == before
    assert adapter_modules(out / "run2") == adapter_modules(out / "run")
    assert read_json(out / "run2" / "ila_selection.json")["ranking"]["copy"] == "ila_ranking.json"
    assert (out / "run2" / "ila_ranking.json").read_bytes() == before


def test_qlora_keep_fraction_trains_only_the_top_modules(searched, tiny_llama, tmp_path):
    cfg = make_config(tiny_llama, tmp_path, adapter="qlora", ila_ranking=str(searched["ranking"]), ila_keep_fraction=0.3, ila_search="never", max_steps=4)
    run_train(write_config(cfg, tmp_path / "config.yml"))
    ranking = load_ranking(searched["ranking"])
    assert adapter_modules(tmp_path / "run") == set(ranking.names[:8])  # round(0.3 * 28) = 8


def test_fused_groups_get_adapters_on_whole_groups_only(searched, tiny_llama, tmp_path):
    cfg = make_config(tiny_llama, tmp_path, ila_ranking=str(searched["ranking"]), ila_keep_fraction=0.3, ila_search="never", ila_fused_groups=True, max_steps=2)
    result = run_train(write_config(cfg, tmp_path / "config.yml"))
    ranking = load_ranking(searched["ranking"])
    expected = select(ranking.names, ranking.names, "ila", keep_fraction=0.3, groups=("qkv", "mlp"))
    adapted = adapter_modules(tmp_path / "run")
    assert adapted == set(expected.kept) and 0 < len(adapted) <= 8  # at most round(0.3 * 28)
    for block in range(4):
        for leaves in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj")):
            members = {name for name in ranking.names if f".layers.{block}." in name and name.endswith(leaves)}
            assert members <= adapted or not members & adapted, f"block {block} split {leaves}"
    assert read_json(tmp_path / "run" / "ila_selection.json")["groups"] == ["qkv", "mlp"]
    assert "whole groups: qkv, mlp" in result.stdout + result.stderr


def test_full_finetuning_freezes_exactly_the_dropped_weights(searched, tiny_llama, tmp_path):
    cfg = make_config(tiny_llama, tmp_path, adapter=None, ila_ranking=str(searched["ranking"]), max_steps=3, learning_rate=0.01)
    run_train(write_config(cfg, tmp_path / "config.yml"))
    base = load_tensors(tiny_llama["model"] / "model.safetensors")
    tuned = load_tensors(tmp_path / "run" / "model.safetensors")
    ranking = load_ranking(searched["ranking"])
    dropped, kept = ranking.names[-7:], ranking.names[:21]
    for name in dropped:
        assert (tuned[f"{name}.weight"] == base[f"{name}.weight"]).all(), f"{name} changed but was dropped"
    for name in kept:
        assert not (tuned[f"{name}.weight"] == base[f"{name}.weight"]).all(), f"{name} did not train"
    # Everything else still trains as usual.
    assert not (tuned["model.embed_tokens.weight"] == base["model.embed_tokens.weight"]).all()
    assert not (tuned["lm_head.weight"] == base["lm_head.weight"]).all()


def test_full_finetuning_searches_then_freezes_exactly_the_dropped_weights(tiny_llama, tmp_path):
    """No ranking: the search (a LoRA warm-up and gates) runs first, then the
    full training, from the base weights, freezes exactly the dropped weights."""
    ranking_path = tmp_path / "ranking.json"
    cfg = make_config(tiny_llama, tmp_path, adapter=None, ila_ranking=str(ranking_path), max_steps=3, learning_rate=0.01,
                      ila_gate_steps=4, ila_warmup_max_steps=3)
    result = run_train(write_config(cfg, tmp_path / "config.yml"))
    assert "the training continues from the warm-up" not in result.stdout + result.stderr
    ranking = load_ranking(ranking_path)
    assert ranking.search["adapter"] == "lora"
    base = load_tensors(tiny_llama["model"] / "model.safetensors")
    tuned = load_tensors(tmp_path / "run" / "model.safetensors")
    for name in ranking.names[21:]:
        assert (tuned[f"{name}.weight"] == base[f"{name}.weight"]).all(), f"{name} changed but was dropped"
    for name in ranking.names[:21]:
        assert not (tuned[f"{name}.weight"] == base[f"{name}.weight"]).all(), f"{name} did not train"


def neox_head_is_targeted() -> bool:
    """Does the installed axolotl's ``lora_target_linear`` adapt GPT-NeoX's ``lm_head``?

    axolotl leaves out the output embedding that ``get_linear_embedding_layers``
    names: 0.19 names GPT-NeoX's ``embed_out``, which transformers 5's GPT-NeoX
    does not have (its head is ``lm_head``), so the head is adapted; 0.20+
    names ``lm_head``, so it is not. The candidates must follow what the
    user's LoRA adapts either way."""
    from axolotl.loaders.utils import get_linear_embedding_layers

    return get_linear_embedding_layers("gpt_neox")[1] != "lm_head"


def test_gpt_neox_search_and_selection(tiny_neox, tmp_path):
    ranking_path = tmp_path / "neox.json"
    cfg = make_config(tiny_neox, tmp_path, ila_ranking=str(ranking_path), ila_gate_steps=8, ila_drop_fraction=0.5)
    run_train(write_config(cfg, tmp_path / "config.yml"))
    ranking = load_ranking(ranking_path)
    # The candidates are what the user's LoRA adapts: the 16 block modules, and
    # lm_head where axolotl's lora_target_linear adapts it.
    head = {"lm_head"} if neox_head_is_targeted() else set()
    assert {name.rsplit(".", 1)[-1] for name in ranking.names} == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"} | head
    assert len(ranking.names) == 16 + len(head)
    assert all(name.startswith("gpt_neox.layers.") or name == "lm_head" for name in ranking.names)
    # 17 modules: drop round(8.5) = 9; 16: drop 8.
    assert adapter_modules(tmp_path / "run") == set(ranking.names[:8])


def test_unranked_strategy_last_drops_the_deepest_block(tiny_neox, tmp_path):
    # 17 candidates (16 in blocks + lm_head, which counts as deepest) or 16
    # (neox_head_is_targeted); 0.3 drops 5 of either.
    cfg = make_config(tiny_neox, tmp_path, ila_strategy="last", ila_drop_fraction=0.3, max_steps=2)
    run_train(write_config(cfg, tmp_path / "config.yml"))
    adapted = adapter_modules(tmp_path / "run")
    assert len(adapted) == (12 if neox_head_is_targeted() else 11)
    assert not any(".layers.3." in name or name == "lm_head" for name in adapted)


def test_ranking_of_another_architecture_is_refused(searched, tiny_neox, tmp_path):
    before = searched["ranking"].read_bytes()
    cfg = make_config(tiny_neox, tmp_path, ila_ranking=str(searched["ranking"]))
    result = run_train(write_config(cfg, tmp_path / "config.yml"), check=False)
    assert result.returncode != 0
    assert f"ranking file {searched['ranking']} was made for another architecture" in result.stderr
    assert searched["ranking"].read_bytes() == before
    assert not (tmp_path / "run" / "ila_selection.json").exists()


def test_resume_uses_the_record_and_refuses_a_conflicting_selection(searched, tiny_llama, tmp_path):
    base = make_config(
        tiny_llama, tmp_path, ila_ranking=str(searched["ranking"]), ila_search="never", max_steps=4,
        save_strategy="steps", save_steps=2, auto_resume_from_checkpoints=True,
    )
    run_train(write_config(base, tmp_path / "first.yml"))
    assert (tmp_path / "run" / "checkpoint-4").is_dir()
    record_before = (tmp_path / "run" / "ila_selection.json").read_bytes()

    conflicting = {**base, "ila_drop_fraction": 0.5, "max_steps": 6}
    result = run_train(write_config(conflicting, tmp_path / "conflict.yml"), check=False)
    assert result.returncode != 0
    assert "resuming in" in result.stderr and "their adapters would not fit" in result.stderr
    assert (tmp_path / "run" / "ila_selection.json").read_bytes() == record_before

    same = {**base, "max_steps": 6}
    result = run_train(write_config(same, tmp_path / "same.yml"))
    assert "ILA: resuming with the selection recorded" in result.stdout + result.stderr
    assert (tmp_path / "run" / "checkpoint-6").is_dir()
    ranking = load_ranking(searched["ranking"])
    assert adapter_modules(tmp_path / "run") == set(ranking.names[:21])


def test_selection_matches_library_logic(searched):
    """The plugin's choice equals what the public selection API computes."""
    ranking = load_ranking(searched["ranking"])
    order = importance_order(ranking.names, "ila", ranking=ranking)
    selection = select(ranking.names, order, "ila", drop_fraction=0.25)
    record = read_json(searched["out"] / "run" / "ila_selection.json")
    assert sorted(record["kept"]) == sorted(selection.kept)


@pytest.mark.parametrize(
    "overrides, existing, message",
    [
        ({"ila_keep_fraction": 0.01}, None, "ila_keep_fraction: 0.01 of 28 modules would leave no module to train"),
        ({"ila_search": "never"}, None, "does not exist"),
        ({"ila_search": "always"}, "my notes\n", "exists and is not a valid ILA ranking"),
        ({}, '{"format": "something-else"}', "'format' is 'something-else'"),
    ],
)
def test_bad_input_stops_before_any_work_and_writes_nothing(tiny_llama, tmp_path, overrides, existing, message):
    ranking = tmp_path / "ranking.json"
    if existing is not None:
        ranking.write_text(existing)
    cfg = make_config(tiny_llama, tmp_path, ila_ranking=str(ranking), **overrides)
    result = run_train(write_config(cfg, tmp_path / "config.yml"), check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert str(ranking) in result.stderr or "ila_keep_fraction" in message
    # No data prepared, no weights, no record: only the log axolotl opens at start.
    assert not (tmp_path / "prepared").exists()
    assert {p.name for p in (tmp_path / "run").iterdir()} <= {"debug.log"}
    if existing is None:
        assert not ranking.exists()
    else:
        assert ranking.read_text() == existing


def has_post_lora_merge() -> bool:
    from axolotl.integrations.base import BasePlugin

    return hasattr(BasePlugin, "post_lora_merge")


@pytest.mark.skipif(
    not has_post_lora_merge(),
    reason="axolotl 0.19's merge-lora calls no plugin hook after saving (post_lora_merge came with 0.21); "
    "test_the_record_and_ranking_are_carried_into_a_merged_models_folder runs ILA's copy on every version",
)
def test_merge_lora_carries_the_record_and_ranking_into_the_merged_model(searched, tmp_path):
    run_dir = searched["out"] / "run"
    cfg = {**searched["cfg"], "lora_model_dir": str(run_dir), "output_dir": str(tmp_path / "merge")}
    result = run_python(["-m", "axolotl.cli.merge_lora", str(write_config(cfg, tmp_path / "merge.yml"))], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-8000:]
    merged = tmp_path / "merge" / "merged"
    assert any(merged.glob("*.safetensors"))  # axolotl's merge itself
    assert (merged / "ila_selection.json").read_bytes() == (run_dir / "ila_selection.json").read_bytes()
    assert (merged / "ila_ranking.json").read_bytes() == searched["ranking"].read_bytes()


def test_the_record_and_ranking_are_carried_into_a_merged_models_folder(searched, tmp_path):
    from axolotl_ila.outputs import carry_into_merged
    from axolotl_ila.selection import SelectionError

    run_dir = searched["out"] / "run"
    written = carry_into_merged(run_dir, tmp_path / "merged")
    assert sorted(p.name for p in written) == ["ila_ranking.json", "ila_selection.json"]
    assert (tmp_path / "merged" / "ila_ranking.json").read_bytes() == searched["ranking"].read_bytes()
    assert carry_into_merged(tmp_path / "no-record", tmp_path / "merged-2") == []  # an adapter trained without ILA
    adapter = tmp_path / "copy-missing"
    adapter.mkdir()
    (adapter / "ila_selection.json").write_bytes((run_dir / "ila_selection.json").read_bytes())
    with pytest.raises(SelectionError, match=r"names the ranking copy ila_ranking.json, which is not in .*copy-missing"):
        carry_into_merged(adapter, tmp_path / "merged-3")
