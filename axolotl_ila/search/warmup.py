"""Stage 1 of the search: LoRA on every candidate module, for the warm-up's length.

Every ``ila_stability_window`` steps the warm-up *probes* the ranking, i.e.
computes the gradient of the training loss with respect to one gate per module
at its starting value (the first step a gate search would take from here), on
one micro-batch, averaged across processes and smoothed over probes. The probes
are logged, and how much their order still moved at the end is the warm-up's
entry in ``search.certainty``. A probe costs one forward and backward of one
micro-batch without weight gradients.

With ``ila_warmup_early_stop`` the warm-up also stops before its length, once
the probed order has settled (``gates.OrderSettle``) and the loss is no longer
clearly falling (its trend over the last half of the steps is within two
standard errors of flat). The loss alone says little (a fine-tuning loss keeps
falling slowly for a long time), and the order alone can look steady early,
while every update is still small and alike.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from axolotl_ila.application import lora_layers
from axolotl_ila.runtime.distributed import all_reduce_mean_, is_main_process
from axolotl_ila.search.gates import Gates, OrderSettle, cycle_batches, gate_loss
from axolotl_ila.search.lora_update import update_norm

LOG = logging.getLogger("axolotl.ila")

PROBE_SMOOTHING = 0.5  # weight of the newest probe in the running average

# Without the early stop the probes decide nothing: they serve the certainty
# record, which compares the last probed order with the one at half the steps.
# A handful spread over the warm-up gives that, whatever its length.
PROBES_WITHOUT_EARLY_STOP = 8


def probe_interval(window: int, cap: int, early_stop: bool) -> int:
    """Warm-up steps between two probes of the ranking: ``ila_stability_window``
    with the early stop (it decides from them); without it, at most
    ``PROBES_WITHOUT_EARLY_STOP`` over the warm-up, never closer than the window.

    A probe changes nothing the training computes (it takes no weight gradient
    and draws its batches from a loader of its own), so how many run changes
    the search's cost, not its ranking."""
    if early_stop:
        return window
    return max(window, math.ceil(cap / PROBES_WITHOUT_EARLY_STOP))


def lora_modules(model: torch.nn.Module) -> dict[str, Any]:
    """Base-model unit name -> PEFT LoRA layer, in model order."""
    return lora_layers(model)


def update_norms(layers: dict[str, Any], adapter: str = "default") -> dict[str, float]:
    """Frobenius norm of each unit's LoRA update ``scaling * B @ A``.

    B starts at zero, so this is how far the update moved during the warm-up.
    """
    return {name: update_norm(layer, adapter) for name, layer in layers.items()}


class PeftInit:
    """The warm-up starts from PEFT's own LoRA draws from the search seed, on
    every axolotl version.

    axolotl 0.21+ draws every LoRA A matrix again after PEFT has made it
    (``ModelLoader._reinit_lora_from_seed``: one generator per module, seeded
    from ``seed`` and the module's name); 0.19 keeps PEFT's. The same config and
    seed would then warm up from another start on each version, and on a task
    whose ranking separates two modules by little, rank differently (the
    planted task 15 of tests/test_planted.py: a block-1 gate_proj ahead of a
    block-0 down_proj by 0.001 with PEFT's draws, behind it with axolotl 0.21's;
    everything else about the two searches is the same to the last digit).
    ``take`` keeps PEFT's draws as the adapters are made (``post_lora_load``,
    which both versions call before 0.21 draws again); ``restore`` puts them
    back once the model is loaded (``post_model_load``). Tensors on the meta
    device or partitioned to nothing (DeepSpeed ZeRO-3) are not kept: axolotl
    does not draw those again either."""

    def __init__(self) -> None:
        self.kept: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def take(self, model: torch.nn.Module) -> None:
        self.kept = {
            name: param.detach().clone()
            for name, param in model.named_parameters()
            if ".lora_A." in name and not param.is_meta and param.numel() > 0
        }

    @torch.no_grad()
    def restore(self, model: torch.nn.Module) -> int:
        """Put PEFT's draws back where they were replaced; how many were."""
        restored = 0
        for name, param in model.named_parameters():
            kept = self.kept.get(name)
            if kept is not None and kept.shape == param.shape and not torch.equal(kept, param.detach()):
                param.copy_(kept)
                restored += 1
        self.kept = {}
        return restored


class RankingProbe:
    """The gate gradient at the gates' starting value, on one micro-batch."""

    def __init__(self, trainer: Any, layers: dict[str, Any]):
        self.trainer = trainer
        self.layers = layers
        self._batches = None
        self.average: torch.Tensor | None = None

    def __call__(self) -> list[float]:
        trainer, model = self.trainer, self.trainer.model
        if self._batches is None:
            self._batches = cycle_batches(trainer.get_train_dataloader())
        batch = next(self._batches)
        trainable = [p for p in model.parameters() if p.requires_grad]
        for param in trainable:
            param.requires_grad_(False)  # only the gates' gradient is wanted
        gates = Gates(self.layers)
        was_training = model.training
        try:
            model.train()
            loss = gate_loss(trainer, model, batch)
            loss.backward()
            grad = gates.scores.grad.detach().clone()
        finally:
            gates.remove()
            for param in trainable:
                param.requires_grad_(True)
            model.train(was_training)
        all_reduce_mean_(grad)
        importance = -grad  # a gate whose opening lowers the loss most is most important
        importance /= importance.pow(2).mean().sqrt().clamp_min(1e-12)  # the loss scale drifts; the order matters
        if self.average is None:
            self.average = importance
        else:
            self.average = (1 - PROBE_SMOOTHING) * self.average + PROBE_SMOOTHING * importance
        return self.average.cpu().tolist()


FALLING_T_STAT = 2.0  # a loss trend this many standard errors below zero is "clearly falling"


def loss_trend(losses: list[float]) -> dict[str, float] | None:
    """Least-squares slope of the loss over the second half of the steps so far,
    relative to the mean loss, and its t statistic (slope / standard error).

    A fine-tuning loss falls slowly for a long time; what matters is whether the
    fall is still clear above the step-to-step noise."""
    ys = losses[len(losses) // 2 :]
    n = len(ys)
    if n < 4:
        return None
    xs = range(n)
    mx, my = (n - 1) / 2, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    residual = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys)) / (n - 2)
    stderr = (residual / sxx) ** 0.5
    t_stat = slope / stderr if stderr > 0 else (0.0 if slope == 0 else -math.inf if slope < 0 else math.inf)
    return {"relative_slope_per_step": slope / max(abs(my), 1e-12), "t_stat": t_stat, "steps": n}


def clearly_falling(losses: list[float]) -> bool:
    trend = loss_trend(losses)
    return trend is not None and trend["t_stat"] < -FALLING_T_STAT


def probe_count(every: int, cap: int) -> int:
    """How many probes a warm-up of ``cap`` steps runs (at step 1, every
    ``every`` steps, and at ``cap``); an early stop runs fewer."""
    return len({1, cap} | set(range(every, cap + 1, every)))


def warmup_callback(probe: RankingProbe, settle: OrderSettle, every: int, cap: int, losses: list[float], early_stop: bool):
    """Probes the ranking every ``every`` steps (and at ``cap``, the order the
    certainty record compares) and stops the warm-up at ``cap``;
    with ``early_stop``, also once the probed ranking has settled and the loss
    is no longer clearly falling.

    Both are needed for an early stop: early in a warm-up the probed order can look steady simply
    because every update is still small and alike (on a planted task it agreed
    with itself at step 20 and was wrong), while the loss, still falling fast,
    says the updates are far from what they will be."""
    from transformers import TrainerCallback

    class WarmupCallback(TrainerCallback):
        stop_reason = "cap"

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if step % every == 0 or step == 1 or step == cap:
                settled = settle.add(step, probe())
                if is_main_process() and step != 1:
                    last = settle.last or {}
                    trend = loss_trend(losses)
                    LOG.info(
                        "ILA warm-up step %d/%d loss %s (trend t=%s) ranking vs step %s: spearman %s, top-75%% jaccard %s",
                        step,
                        cap,
                        f"{losses[-1]:.4f}" if losses else "n/a",
                        f"{trend['t_stat']:.1f}" if trend else "n/a",
                        last.get("compared_with_step", "n/a"),
                        last.get("spearman", "n/a"),
                        last.get("top75_jaccard", "n/a"),
                    )
                # The probe is averaged across ranks and the logged loss is
                # gathered across them, so every rank decides alike.
                if early_stop and settled and not clearly_falling(losses):
                    self.stop_reason = "settled"
                    control.should_training_stop = True
            if step >= cap:
                control.should_training_stop = True

    return WarmupCallback()
