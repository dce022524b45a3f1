"""The gate search on a task whose answer is known, and its determinism.

Known answer: a teacher equals the tiny base model plus large low-rank deltas in
three chosen modules; the training data are sequences sampled from the teacher.
LoRA on the base can only match the teacher by moving those three modules, so a
search on the base must rank exactly them first.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from axolotl_ila.ranking import load_ranking
from axolotl_ila.search import StabilityMonitor, budget_shift
from axolotl_ila.tiny import build_workspace, write_jsonl
from conftest import make_config, read_json, write_config

CHOSEN = ["model.layers.0.mlp.down_proj", "model.layers.2.self_attn.o_proj", "model.layers.3.mlp.up_proj"]


def build_teacher_task(root: Path) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    # A wider init makes the random base confident, so its samples carry structure.
    workspace = build_workspace(root, "llama", initializer_range=0.15)
    teacher = AutoModelForCausalLM.from_pretrained(str(workspace["model"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in CHOSEN:
            weight = teacher.get_submodule(name).weight
            # A rank-1 delta as large as the weight itself.
            delta = torch.randn(weight.shape[0], 1, generator=generator) @ torch.randn(1, weight.shape[1], generator=generator)
            weight += delta * (weight.norm() / delta.norm())
        torch.manual_seed(0)
        start = torch.full((512, 1), teacher.config.bos_token_id)
        samples = teacher.generate(
            start, do_sample=True, temperature=0.7, max_new_tokens=60, min_new_tokens=60, top_k=0, pad_token_id=3
        )
    # Pre-tokenized rows: axolotl uses them as they are (no lossy text round trip).
    rows = [{"input_ids": s.tolist(), "attention_mask": [1] * len(s), "labels": s.tolist()} for s in samples]
    data = write_jsonl(root / "teacher.jsonl", rows)
    return {"model": workspace["model"], "data": data}


def search_config(task: dict[str, Path], out: Path, ranking: Path) -> Path:
    cfg = make_config(
        task,
        out,
        max_steps=300,
        learning_rate=0.01,
        micro_batch_size=8,
        lora_r=4,
        lora_alpha=8,
        datasets=[{"path": str(task["data"]), "ds_type": "json", "type": "completion"}],
        ila_ranking=str(ranking),
        ila_warmup_fraction=0.5,
        ila_stability_tolerance=0.0001,
        ila_gate_steps=64,
    )
    return write_config(cfg, out / f"{ranking.stem}.yml")


def run_search(config: Path) -> None:
    code = f"from axolotl_ila.plugin import search_config_file; search_config_file({str(config)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=config.parent, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]


@pytest.fixture(scope="module")
def teacher_task(tmp_path_factory) -> dict[str, Path]:
    return build_teacher_task(tmp_path_factory.mktemp("teacher"))


@pytest.mark.e2e
def test_search_ranks_the_teachers_modules_first(teacher_task, tmp_path):
    ranking_path = tmp_path / "a.json"
    run_search(search_config(teacher_task, tmp_path, ranking_path))
    ranking = load_ranking(ranking_path)
    assert set(ranking.names[:3]) == set(CHOSEN), ranking.names[:6]
    search = read_json(ranking_path)["search"]
    assert search["stage1"]["stop_reason"] in {"stable", "cap"}
    assert search["stage1"]["max_steps"] == 150  # half of the planned 300 steps
    assert 0 < search["stage1"]["steps"] <= 150
    assert search["stage2"]["steps"] == 64
    assert search["stage1"]["loss_last"] < search["stage1"]["loss_first"]
    assert search["versions"]["axolotl"]

    # Same config and seed: the same ranking, score for score.
    again_path = tmp_path / "b.json"
    run_search(search_config(teacher_task, tmp_path, again_path))
    again = load_ranking(again_path)
    assert again.names == ranking.names
    assert [m.score for m in again.modules] == pytest.approx([m.score for m in ranking.modules], abs=1e-6)


def test_budget_shift_holds_mean_gate_and_order():
    scores = torch.tensor([3.0, 1.0, 0.5, -2.0])
    shift = budget_shift(scores, 0.4)
    shifted = scores - shift
    assert float(torch.sigmoid(shifted).mean()) == pytest.approx(0.4, abs=1e-6)
    assert torch.equal(torch.argsort(shifted), torch.argsort(scores))
    assert budget_shift(torch.full((4,), -3.0), 0.4) == 0.0  # already within budget


def test_stability_monitor_needs_two_windows_and_min_steps():
    monitor = StabilityMonitor(window=3, tolerance=0.01, min_steps=8)
    for loss in [5.0, 4.0, 3.0, 2.0, 2.0, 2.0]:
        monitor.update(loss)
    assert monitor.relative_change == pytest.approx(abs(2.0 - 4.0) / 4.0)
    assert not monitor.stable
    for _ in range(3):
        monitor.update(2.0)
    assert monitor.relative_change == 0.0 and monitor.stable
