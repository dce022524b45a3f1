"""The gate search on tasks whose answer is known, and its stopping rules.

Known answer: a teacher equals the tiny base model plus large rank-4 deltas in
a few chosen modules; the training data are sequences sampled from the teacher.
LoRA on the base can only match the teacher by moving those modules, so a
search on the base must rank exactly them first, whatever kind they are
(attention value or output projections, MLP projections), at default settings.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from axolotl_ila.analysis import top_jaccard
from axolotl_ila.gates import OrderSettle, budget_shift, spearman
from axolotl_ila.ranking import load_ranking
from axolotl_ila.tiny import build_workspace, write_jsonl
from conftest import make_config, read_json, write_config

PLANTED = {
    # The case: an attention value projection beside two MLP modules.
    "value_and_mlp": ["model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj", "model.layers.3.mlp.up_proj"],
    # Attention output and query projections, and an MLP gate.
    "attention_and_gate": ["model.layers.2.self_attn.o_proj", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj"],
}


def build_teacher_task(root: Path, chosen: list[str], rank: int = 4) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    # A wider init makes the random base confident, so its samples carry structure.
    workspace = build_workspace(root, "llama", initializer_range=0.15)
    teacher = AutoModelForCausalLM.from_pretrained(str(workspace["model"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in chosen:
            weight = teacher.get_submodule(name).weight
            # A rank-`rank` delta as large as the weight itself.
            delta = torch.randn(weight.shape[0], rank, generator=generator) @ torch.randn(rank, weight.shape[1], generator=generator)
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


def search_config(task: dict[str, Path], out: Path, ranking: Path, **overrides) -> Path:
    """LoRA r=8, learning rate 3e-3, batch 32, 400 planned steps; every ila_
    key at its default."""
    cfg = make_config(
        task,
        out,
        max_steps=400,
        learning_rate=0.003,
        micro_batch_size=32,
        lora_r=8,
        lora_alpha=16,
        datasets=[{"path": str(task["data"]), "ds_type": "json", "type": "completion"}],
        ila_ranking=str(ranking),
        **overrides,
    )
    return write_config(cfg, out / f"{ranking.stem}.yml")


def run_search(config: Path) -> None:
    code = f"from axolotl_ila.plugin import search_config_file; search_config_file({str(config)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=config.parent, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]


@pytest.mark.e2e
@pytest.mark.parametrize("task", sorted(PLANTED))
def test_search_ranks_the_planted_modules_first(task, tmp_path):
    chosen = PLANTED[task]
    teacher = build_teacher_task(tmp_path / "teacher", chosen)
    ranking_path = tmp_path / "a.json"
    run_search(search_config(teacher, tmp_path, ranking_path))
    ranking = load_ranking(ranking_path)
    assert set(ranking.names[: len(chosen)]) == set(chosen), ranking.names[:6]
    search = read_json(ranking_path)["search"]
    stage1, stage2 = search["stage1"], search["stage2"]
    assert stage1["max_steps"] == 100  # a quarter of the planned 400 steps
    assert stage1["stop_reason"] in {"settled", "cap"} and 0 < stage1["steps"] <= 100
    assert stage2["stop_reason"] in {"settled", "cap"} and 0 < stage2["steps"] <= 128
    assert stage1["loss_last"] < stage1["loss_first"]
    assert search["versions"]["axolotl"]
    if task == "value_and_mlp":
        # Same config and seed: the same ranking, score for score.
        again_path = tmp_path / "b.json"
        run_search(search_config(teacher, tmp_path, again_path))
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


def test_rank_agreement_measures():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert top_jaccard([4, 3, 2, 1], [4, 3, 1, 2], fraction=0.5) == 1.0
    assert top_jaccard([4, 3, 2, 1], [1, 2, 3, 4], fraction=0.5) == 0.0


def test_order_settle_compares_with_half_the_steps_and_needs_two_agreements():
    settle = OrderSettle(agreement=0.9, min_steps=0)
    order = [float(i) for i in range(20)]
    assert not settle.add(1, order)  # nothing at half of step 1 yet
    assert not settle.add(10, order)  # agrees with step 1 (<= 5): first agreement
    assert settle.last["compared_with_step"] == 1
    assert settle.add(20, order)  # agrees with step 10: second in a row
    assert settle.last["compared_with_step"] == 10


def test_order_settle_does_not_stop_on_a_slow_drift():
    """The order moves steadily from one permutation to another: each check
    looks like the one before (rank correlation > 0.97), so a neighbour
    comparison would stop at once; the comparison with half the steps sees the
    drift and never stops while it lasts."""
    import random

    n, checks = 40, 12
    start = [float(i) for i in range(n)]
    target = list(start)
    random.Random(0).shuffle(target)

    def scores(check: int) -> list[float]:
        w = check / checks
        return [(1 - w) * a + w * b for a, b in zip(start, target)]

    settle = OrderSettle(agreement=0.9, min_steps=0)
    for check in range(1, checks + 1):
        assert not settle.add(10 * check, scores(check)), settle.last
        if check > 1:
            assert spearman(scores(check), scores(check - 1)) > 0.97


def test_order_settle_respects_min_steps():
    settle = OrderSettle(agreement=0.5, min_steps=50)
    order = [float(i) for i in range(10)]
    results = [settle.add(step, order) for step in (1, 10, 20, 40, 80)]
    assert results == [False, False, False, False, True]


def test_the_warmup_does_not_stop_while_the_loss_is_clearly_falling():
    """Its ranking probe says "settled" at every check; it still goes on while
    the loss falls clearly (a slow, noisy fall as in fine-tuning), and stops once
    the loss is flat."""
    import random

    from transformers import TrainerControl, TrainerState

    from axolotl_ila.warmup import clearly_falling, warmup_callback

    rng = random.Random(0)
    falling = [5.5 - 0.006 * step + rng.gauss(0, 0.03) for step in range(200)]  # 1% per 10 steps
    assert clearly_falling(falling[:40])
    flat = [4.3 + rng.gauss(0, 0.03) for _ in range(200)]
    assert not clearly_falling(flat[:40])

    def stop_step(curve: list[float]) -> int | None:
        settle = OrderSettle(agreement=0.9, min_steps=10)
        losses: list[float] = []
        callback = warmup_callback(lambda: [float(i) for i in range(28)], settle, every=10, cap=150, losses=losses)
        state, control = TrainerState(), TrainerControl()
        for step, loss in enumerate(curve[:150], start=1):
            state.global_step = step
            callback.on_log(None, state, control, logs={"loss": loss})
            callback.on_step_end(None, state, control)
            if control.should_training_stop:
                return step if callback.stop_reason == "settled" else None
        return None

    assert stop_step(falling) is None  # ran to its cap
    assert stop_step(flat) == 20
