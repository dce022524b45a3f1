"""Stage 2 of the search: one learned sigmoid gate per module, everything else frozen.

Unit i's LoRA update is multiplied by sigmoid(s_i), so its weight becomes
``W0_i + scaling * sigmoid(s_i) * B_i A_i``. The scores s are learned on the
training loss under a budget on the mean gate (the paper's ||gamma|| < H); they
stop when their order has settled (``OrderSettle``), or at ``ila_gate_steps``.

The same gates, at their starting value and without a step, are the warm-up's
probe of the ranking (``probe_scores``): the first gradient a gate search would
take from the current warm-up state.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from axolotl_ila.ranking.analysis import top_jaccard
from axolotl_ila.runtime.distributed import all_reduce_grad_mean_, all_reduce_mean_, is_main_process
from axolotl_ila.search.lora_update import install_gate, lora_parameters
from axolotl_ila.search.settings import SearchError

LOG = logging.getLogger("axolotl.ila")


class Gates:
    """Scores s_i whose sigmoid scales unit i's LoRA update (``lora_update.install_gate``:
    LoRA on plain, 4-bit and 8-bit linears, ``Conv1D`` and expert parameters alike)."""

    def __init__(self, layers: dict[str, Any], init: float = 0.0, adapter: str = "default"):
        self.names = list(layers)
        first = next(iter(layers.values())).lora_B[adapter].weight
        self.scores = torch.full((len(self.names),), float(init), device=first.device, dtype=torch.float32, requires_grad=True)
        self._hooks = [install_gate(layer, self._gate(i), adapter) for i, layer in enumerate(layers.values())]

    def _gate(self, index: int):
        return lambda: torch.sigmoid(self.scores[index])

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def mean_gate(self) -> float:
        return float(torch.sigmoid(self.scores.detach()).mean())

    def result(self) -> dict[str, float]:
        return dict(zip(self.names, self.scores.detach().cpu().tolist()))


def budget_shift(scores: torch.Tensor, budget: float, iterations: int = 60) -> float:
    """Smallest common shift t >= 0 with mean(sigmoid(scores - t)) <= budget."""
    if float(torch.sigmoid(scores).mean()) <= budget:
        return 0.0
    logit = math.log(budget / (1 - budget))
    lo, hi = 0.0, float(scores.max()) - logit + 1.0  # mean at hi is below budget
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if float(torch.sigmoid(scores - mid).mean()) > budget:
            lo = mid
        else:
            hi = mid
    return hi


class GateStep:
    """The update rule of the scores, under the budget.

    Budget: after every step, all scores shift by one common amount so that the
    mean gate stays at most ``budget`` (an exact, order-preserving projection onto
    {mean(sigmoid(s)) <= budget}). Without a budget every gate simply opens,
    since every warmed-up LoRA update lowers the loss; with one, opening a gate
    closes the others a little, so modules compete and the scores separate.

    The step is momentum SGD normalised by one running RMS over *all* gates: the
    step size does not depend on the loss scale, yet a gate whose gradient is
    twice as large moves twice as far (a per-gate Adam would move every gate at
    the same speed and erase exactly the differences we want to measure).
    """

    def __init__(self, gates: Gates, budget: float, lr: float):
        self.gates = gates
        self.budget = budget
        self.lr = lr
        self._momentum = torch.zeros_like(gates.scores)
        self._sq = 0.0
        self._steps = 0

    @torch.no_grad()
    def step(self, beta1: float = 0.9, beta2: float = 0.99, eps: float = 1e-12) -> None:
        scores = self.gates.scores
        grad = scores.grad
        all_reduce_mean_(grad)
        self._steps += 1
        self._momentum.mul_(beta1).add_(grad, alpha=1 - beta1)
        self._sq = beta2 * self._sq + (1 - beta2) * float(grad.pow(2).mean())
        m_hat = self._momentum / (1 - beta1**self._steps)
        rms = math.sqrt(self._sq / (1 - beta2**self._steps))
        scores.sub_(self.lr * m_hat / (rms + eps))
        scores.sub_(budget_shift(scores, self.budget))
        scores.grad = None


# --------------------------------------------------------------------------- settling


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation of two score vectors (ties broken by position)."""
    n = len(a)
    if n < 2:
        return 1.0

    def ranks(values: list[float]) -> list[int]:
        order = sorted(range(n), key=lambda i: (values[i], i))
        out = [0] * n
        for r, i in enumerate(order):
            out[i] = r
        return out

    ra, rb = ranks(a), ranks(b)
    d2 = sum((x - y) ** 2 for x, y in zip(ra, rb))
    return 1.0 - 6.0 * d2 / (n * (n * n - 1))


@dataclass
class OrderSettle:
    """Has an order of scores stopped changing?

    Scores are recorded at regular checks. At a check at step t, the current
    scores are compared with those recorded at about t/2: the order has settled
    when their rank correlation is at least ``agreement`` and their top-75% sets
    agree at Jaccard >= ``agreement`` too, at two checks in a row. Comparing
    with half the elapsed steps, not with the previous check, is what catches
    a slow drift: two neighbouring checks of a drifting order always look alike.
    """

    agreement: float
    min_steps: int
    history: list[tuple[int, list[float]]] = field(default_factory=list)
    streak: int = 0
    last: dict[str, float] | None = None  # the last comparison made

    def add(self, step: int, scores: list[float]) -> bool:
        """Record the scores at ``step``; True once the order has settled."""
        self.history.append((step, list(scores)))
        reference = self._reference(step)
        if reference is None:
            return False
        ref_step, ref_scores = reference
        rho = spearman(scores, ref_scores)
        jaccard = top_jaccard(scores, ref_scores)
        self.last = {"step": step, "compared_with_step": ref_step, "spearman": round(rho, 4), "top75_jaccard": round(jaccard, 4)}
        agrees = rho >= self.agreement and jaccard >= self.agreement
        self.streak = self.streak + 1 if agrees else 0
        return self.streak >= 2 and step >= self.min_steps

    def _reference(self, step: int) -> tuple[int, list[float]] | None:
        earlier = [(s, v) for s, v in self.history[:-1] if s <= step / 2]
        return earlier[-1] if earlier else None


# --------------------------------------------------------------------------- stage 2


def cycle_batches(dataloader) -> Iterator[Any]:
    """The dataloader's batches, over and over."""
    while True:
        yielded = False
        for batch in dataloader:
            yielded = True
            yield batch
        if not yielded:
            raise SearchError("the training dataloader is empty; check datasets and sequence_len.")


def gate_loss(trainer: Any, model: Any, batch: Any, num_items_in_batch: Any = None):
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    with trainer.compute_loss_context_manager():
        return trainer.compute_loss(model, batch, **kwargs)


def _loss_is_scaled_for_ga(trainer: Any, num_items_in_batch: Any) -> bool:
    """Whether the trainer's ``compute_loss`` already normalises a micro-batch's
    loss over the whole accumulated batch, as ``training_step`` decides it:
    transformers 5.20+ lets a trainer say so (``loss_is_scaled_for_ga``);
    otherwise it is when the loss was divided by ``num_items_in_batch``."""
    explicit = getattr(trainer, "loss_is_scaled_for_ga", None)
    if explicit is not None:
        return bool(explicit)
    accepts = getattr(trainer, "model_accepts_loss_kwargs", False)
    return bool((accepts and num_items_in_batch is not None) or getattr(trainer, "compute_loss_func", None) is not None)


def step_losses(trainer: Any, model: Any, batches: Iterator[Any], accumulation: int) -> Iterator[Any]:
    """The losses of one optimizer step's micro-batches, each weighted as the
    trainer's own training step weighs it, so that the gates learn on the
    objective the training optimises.

    The micro-batches and their label count come from the trainer
    (``get_batch_samples``, as its training loop takes them). Where the trainer
    normalises by that count (axolotl 0.21: the model's loss takes
    ``num_items_in_batch``), every label token of the accumulated batch weighs
    the same; where it does not (axolotl 0.19 turns it off for PEFT models),
    every micro-batch's mean weighs 1/accumulation."""
    samples, num_items = trainer.get_batch_samples(batches, accumulation, trainer.args.device)
    scaled = _loss_is_scaled_for_ga(trainer, num_items)
    for batch in samples:
        loss = gate_loss(trainer, model, batch, num_items)
        yield loss if scaled else loss / accumulation


# Observers of the gate stage: called at every settle check with the pass's
# label ("gates", or "re-learning check"), the step and the scores by module
# name. A study that wants the order along the way (benchmarks/planted records
# the order after 16, 32, ... gate steps) registers one with
# ``observe_gate_checks``; a search itself registers none.
GateObserver = Callable[[str, int, dict[str, float]], None]
_OBSERVERS: list[GateObserver] = []


@contextmanager
def observe_gate_checks(observer: GateObserver) -> Iterator[None]:
    """Call ``observer(label, step, scores)`` at every settle check of every
    gate pass run in this process while the context is open."""
    _OBSERVERS.append(observer)
    try:
        yield
    finally:
        _OBSERVERS.remove(observer)


def run_gates(
    trainer: Any,
    layers: dict[str, Any],
    max_steps: int,
    lr: float,
    budget: float,
    agreement: float,
    check_every: int = 4,
    min_steps: int = 16,
    lora_lr: float | None = None,
    label: str = "gates",
) -> tuple[dict[str, float], dict[str, Any]]:
    """Learn the gate scores until their order settles (or ``max_steps``).

    ``lora_lr``: the LoRA matrices keep learning beside the gates (AdamW at
    this learning rate, fresh moments), so that a module whose gate closes
    loses its share of the fit and the open ones must take it over: the gates
    compete for what training only the open modules would buy, not only for
    what each update gives now. None: LoRA frozen (the paper's stage 2).
    ``label`` names the pass in the progress bar and the log."""
    from tqdm.auto import tqdm

    model = trainer.model
    for param in model.parameters():
        param.requires_grad_(False)
    lora_params = lora_parameters(layers) if lora_lr is not None else []
    for param in lora_params:
        param.requires_grad_(True)
    lora_optimizer = torch.optim.AdamW(lora_params, lr=lora_lr, weight_decay=0.0) if lora_params else None
    gates = Gates(layers)
    update = GateStep(gates, budget=budget, lr=lr)
    settle = OrderSettle(agreement=agreement, min_steps=min(min_steps, max_steps))
    accumulation = int(trainer.args.gradient_accumulation_steps or 1)
    batches = cycle_batches(trainer.get_train_dataloader())
    losses: list[float] = []
    stop_reason = "cap"
    model.train()
    bar = tqdm(range(max_steps), desc=f"ILA {label}", disable=not is_main_process())
    try:
        for step in bar:
            total = 0.0
            for loss in step_losses(trainer, model, batches, accumulation):
                loss.backward()
                total += float(loss.detach())
            update.step()
            if lora_optimizer is not None:
                for param in lora_params:
                    if param.grad is not None:
                        all_reduce_grad_mean_(param.grad)
                lora_optimizer.step()
                lora_optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            bar.set_postfix(loss=f"{total:.4f}", mean_gate=f"{gates.mean_gate():.3f}")
            done = step + 1
            # Scores are identical on every rank (averaged gradients), so every
            # rank reaches the same decision at the same step.
            if done % check_every == 0:
                scores = gates.scores.detach().cpu().tolist()
                for observer in _OBSERVERS:
                    observer(label, done, dict(zip(gates.names, scores)))
                if settle.add(done, scores):
                    stop_reason = "settled"
                    break
    finally:
        gates.remove()
    if is_main_process():
        LOG.info("ILA %s stopped after %d/%d steps (%s), mean gate %.3f", label, len(losses), max_steps, stop_reason, gates.mean_gate())
    record = {
        "steps": len(losses),
        "max_steps": max_steps,
        "stop_reason": stop_reason,
        "settle": {"check_every": check_every, "agreement": agreement, "min_steps": settle.min_steps, "last_check": settle.last},
        "lr": lr,
        "budget": budget,
        "budget_mechanism": "mean gate <= budget by a common shift of all scores after each step",
        "init_score": 0.0,
        "lora_learning_rate": lora_lr,  # None: LoRA frozen during the gates
        "gradient_accumulation_steps": accumulation,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_curve": curve(losses),
        "mean_gate": gates.mean_gate(),
    }
    return gates.result(), record


def curve(values: list[float], points: int = 20) -> list[float]:
    """A short summary of a loss curve: ``points`` evenly spaced samples."""
    if len(values) <= points:
        return [round(v, 5) for v in values]
    return [round(values[round(i * (len(values) - 1) / (points - 1))], 5) for i in range(points)]
