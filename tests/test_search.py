"""The gate search's pieces: the budget, the rank agreement measures and the
stopping rules. What a whole search buys on tasks with a measured answer is
tested in test_planted.py."""

from __future__ import annotations

import pytest
import torch

from axolotl_ila.ranking.analysis import top_jaccard
from axolotl_ila.search.gates import OrderSettle, budget_shift, spearman


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
    """With ila_warmup_early_stop. Its ranking probe says "settled" at every check; it still goes on while
    the loss falls clearly (a slow, noisy fall as in fine-tuning), and stops once
    the loss is flat."""
    import random

    from transformers import TrainerControl, TrainerState

    from axolotl_ila.search.warmup import clearly_falling, warmup_callback

    rng = random.Random(0)
    falling = [5.5 - 0.006 * step + rng.gauss(0, 0.03) for step in range(200)]  # 1% per 10 steps
    assert clearly_falling(falling[:40])
    flat = [4.3 + rng.gauss(0, 0.03) for _ in range(200)]
    assert not clearly_falling(flat[:40])

    def stop_step(curve: list[float], early_stop: bool = True) -> int | None:
        settle = OrderSettle(agreement=0.9, min_steps=10)
        losses: list[float] = []
        callback = warmup_callback(lambda: [float(i) for i in range(28)], settle, every=10, cap=150, losses=losses, early_stop=early_stop)
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
    # Without ila_warmup_early_stop (the default) a settled order and a flat
    # loss do not stop it: the warm-up runs its whole length.
    assert stop_step(flat, early_stop=False) is None


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False])
def test_the_gates_weigh_micro_batches_as_the_trainers_own_training_step(tiny_llama, tmp_path, accepts_loss_kwargs):
    """Under gradient accumulation the gates take the gradient the trainer's own
    training step takes over the same micro-batches, however the installed
    trainer weighs them: every label token alike (the model's loss takes
    num_items_in_batch: transformers' default, and axolotl 0.21's), or every
    micro-batch's mean alike (axolotl 0.19 turns the former off for PEFT models).
    The two micro-batches here have 6 and 28 label tokens, so the two differ."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from axolotl_ila.search.gates import step_losses

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama["model"]))
    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args)
    trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
    trainer.current_gradient_accumulation_steps = 2  # what the training loop sets

    def micro_batch(label_tokens: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(3, 100, (2, 16))
        labels = ids.clone()
        labels[:, : 16 - label_tokens // 2] = -100  # label_tokens // 2 per row
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    batches = [micro_batch(6), micro_batch(28)]
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient(run) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        run()
        return [p.grad.detach().clone() for p in params]

    def training() -> None:
        samples, num_items = trainer.get_batch_samples(iter(batches), 2, args.device)
        for batch in samples:
            trainer.training_step(model, batch, num_items)

    def gates() -> None:
        model.train()
        for loss in step_losses(trainer, model, iter(batches), 2):
            loss.backward()

    expected, got = gradient(training), gradient(gates)
    assert all(torch.allclose(g, e, rtol=1e-4, atol=1e-7) for g, e in zip(got, expected))
    # The weighting matters here: equal micro-batch means give another gradient than equal tokens.
    trainer.model_accepts_loss_kwargs = not accepts_loss_kwargs
    other = gradient(training)
    assert not all(torch.allclose(g, e, rtol=1e-4, atol=1e-7) for g, e in zip(other, expected))
