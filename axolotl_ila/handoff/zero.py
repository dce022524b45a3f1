"""The warm-up's handover under DeepSpeed ZeRO-2 and ZeRO-3 (LoRA).

Under ZeRO the optimizer does not hold the LoRA weights: it holds flat fp32
partitions (ZeRO-2: of every trainable weight flattened together; ZeRO-3: of
each weight) and AdamW's moments of those, each rank its own slice. The
training's engine is built for the kept modules only, so its partitions are
laid out differently from the warm-up's. The handover therefore goes per
parameter, through DeepSpeed's accessors for any stage
(``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``
and their ``safe_set_`` twins), never through DeepSpeed's flat checkpoint files:

- the warm-up captures, for every trainable LoRA weight, its whole fp32 master
  weight and AdamW moments (collectives: every rank, same order), with AdamW's
  step count, the optimizer's hyper-parameters (the scheduled learning rate)
  and the engine's step counters (``ZeroWarmState``);
- the main process writes the kept modules' part into the warm-up checkpoint
  as ``ila_zero_state.pt`` (handoff.py writes the rest: adapter, scheduler,
  trainer state);
- the training resumes from that checkpoint with transformers' own resume.
  Under DeepSpeed that calls ``transformers.trainer.deepspeed_load_checkpoint``,
  which accepts only DeepSpeed's own checkpoints (``global_step*/``); the plugin
  wraps that one call (``install_resume``): for a checkpoint holding
  ``ila_handoff.json`` and ``ila_zero_state.pt`` the wrap applies the state
  (``apply``), for every other checkpoint it calls the original. The rest of
  the resume (scheduler.pt, trainer_state.json, skipping the warm-up's batches)
  is transformers' own;
- ``apply`` (every rank, once the engine exists, before any step) gives each
  flat partition AdamW's state at the warm-up's step (AdamW creates it lazily at
  the first step, so a fresh engine has none), sets each kept weight's fp32
  master and moments with the ``safe_set_`` accessors and the model's own copy
  of the weight (ZeRO-3: gathered, set and re-partitioned by
  ``deepspeed.zero.GatheredParameters``), the optimizer's hyper-parameters and
  the engine's step counters (so that its checkpoints are named
  ``global_step<N>`` by the trainer's step, as in an uninterrupted run);
- ``verify`` (HandoffCheck, every rank, before the first step) reads it all back
  and stops the run if anything differs.

Only AdamW-style state (``exp_avg``, ``exp_avg_sq``, ``step``: torch's Adam and
AdamW, which the trainer creates when the DeepSpeed config names no optimizer)
is handed over; anything else stops the run before the search is wasted
(``engines.continuation_refusal`` refuses a DeepSpeed config's own
``optimizer`` or ``scheduler``; ``capture`` checks the state it finds).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from axolotl_ila.handoff.names import HANDOFF_NAME
from axolotl_ila.runtime.distributed import is_zero3_partitioned

ZERO_STATE_FILE = "ila_zero_state.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")
ADAM_STATE = {"step", *MOMENTS}


class ZeroHandoffError(RuntimeError):
    """The warm-up's state could not be handed over under DeepSpeed."""


def is_deepspeed_trainer(trainer: Any) -> bool:
    """A trainer that trains under DeepSpeed (its engine, ``trainer.model_wrapped``,
    exists once training starts)."""
    return bool(getattr(trainer, "is_deepspeed_enabled", False))


def _flat_partitions(zero_optimizer: Any) -> list[torch.Tensor]:
    """This rank's flat fp32 partitions, the tensors the inner torch optimizer
    keeps its state under (ZeRO-3: ``fp32_partitioned_groups_flat``; ZeRO-1/2:
    ``single_partition_of_fp32_groups``)."""
    for attribute in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        flats = getattr(zero_optimizer, attribute, None)
        if flats is not None:
            return list(flats)
    raise ZeroHandoffError(
        f"ILA: the DeepSpeed optimizer {type(zero_optimizer).__name__} is not a ZeRO-2 or ZeRO-3 optimizer "
        f"(no flat fp32 partitions), so the warm-up cannot hand over to it. Set ila_continue: false."
    )


def _trainable(model: Any) -> list[tuple[str, Any]]:
    """The trainable weights in the model's order (the same on every rank)."""
    found = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    others = [n for n, _ in found if ".lora_" not in n]
    if others:
        raise ZeroHandoffError(
            f"ILA: under DeepSpeed the warm-up hands over LoRA weights only, but {len(others)} other weights "
            f"train (e.g. {others[0]}; lora_modules_to_save?). Set ila_continue: false, or remove them."
        )
    return found


def _gathered_for_writing(param: Any):
    """ZeRO-3: the whole weight, re-partitioned from rank 0's copy on exit (a
    collective); otherwise the weight itself."""
    if not is_zero3_partitioned(param):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)


def _gathered_for_reading(param: Any):
    if not is_zero3_partitioned(param):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=None)


@dataclass
class ZeroWarmState:
    """The warm-up's state under ZeRO, whole tensors on the CPU of every rank."""

    params: dict[str, dict[str, torch.Tensor]]  # parameter name -> fp32 master and moments
    adam_step: Any  # AdamW's ``step`` (a tensor for torch's AdamW)
    param_groups: list[dict[str, Any]]  # the inner optimizer's hyper-parameters, per group
    global_steps: int  # the engine's step counters
    global_samples: int

    @classmethod
    def capture(cls, trainer: Any) -> "ZeroWarmState":
        """Every rank, in the same order (the accessors are collectives)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        engine = trainer.model_wrapped
        zero_optimizer = engine.optimizer
        inner = zero_optimizer.optimizer
        states = [inner.state[flat] for flat in _flat_partitions(zero_optimizer) if flat in inner.state]
        found = sorted(set().union(*(set(s) for s in states))) if states else []
        if not states or any(set(s) != ADAM_STATE for s in states):
            raise ZeroHandoffError(
                f"ILA: under DeepSpeed the warm-up hands over AdamW's state (exp_avg, exp_avg_sq, step), but the "
                f"optimizer {type(inner).__name__} holds {found or 'none'}; set ila_continue: false, or use "
                f"torch's AdamW (optimizer: adamw_torch, amsgrad off)."
            )
        steps = {float(s["step"]) for s in states}
        if len(steps) != 1:
            raise ZeroHandoffError(f"ILA: the warm-up's AdamW partitions disagree on the step count ({sorted(steps)})")
        params = {}
        for name, param in _trainable(trainer.model):
            entry = {"fp32": safe_get_full_fp32_param(param)}
            for key in MOMENTS:
                entry[key] = safe_get_full_optimizer_state(param, key)
            if any(v is None for v in entry.values()):
                raise ZeroHandoffError(f"ILA: DeepSpeed has no fp32 master or AdamW state for {name}")
            params[name] = {k: v.detach().float().cpu().clone() for k, v in entry.items()}
        step = states[0]["step"]
        return cls(
            params=params,
            adam_step=step.detach().cpu().clone() if torch.is_tensor(step) else step,
            param_groups=[{k: v for k, v in group.items() if k != "params"} for group in inner.param_groups],
            global_steps=int(engine.global_steps),
            global_samples=int(engine.global_samples),
        )

    def kept_only(self, is_kept: Any) -> dict[str, Any]:
        """What ``ila_zero_state.pt`` holds: the kept modules' weights only."""
        return {
            "params": {n: s for n, s in self.params.items() if is_kept(n)},
            "adam_step": self.adam_step,
            "param_groups": self.param_groups,
            "global_steps": self.global_steps,
            "global_samples": self.global_samples,
        }


def is_zero_handoff(checkpoint: str | Path) -> bool:
    """A warm-up checkpoint written under DeepSpeed."""
    folder = Path(checkpoint)
    return (folder / HANDOFF_NAME).is_file() and (folder / ZERO_STATE_FILE).is_file()


def _load(checkpoint: str | Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / ZERO_STATE_FILE, map_location="cpu", weights_only=True)


def _check_same_weights(engine: Any, saved: dict[str, Any], checkpoint: str | Path) -> list[tuple[str, Any]]:
    trainable = _trainable(engine.module)
    names = [n for n, _ in trainable]
    if set(names) != set(saved["params"]):
        missing = sorted(set(saved["params"]) - set(names)) or sorted(set(names) - set(saved["params"]))
        raise ZeroHandoffError(
            f"ILA: the training's trainable LoRA weights are not those of the warm-up's checkpoint {checkpoint} "
            f"(e.g. {missing[0]}); the handover failed. Set ila_continue: false to train from fresh adapters."
        )
    return trainable


def apply(engine: Any, checkpoint: str | Path) -> None:
    """Put the warm-up's state into the training's engine. Every rank, before
    the first step, in the same order (ZeRO-3's gathers are collectives)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    saved = _load(checkpoint)
    trainable = _check_same_weights(engine, saved, checkpoint)
    zero_optimizer = engine.optimizer
    inner = zero_optimizer.optimizer
    flats = _flat_partitions(zero_optimizer)
    if any(inner.state.get(flat) for flat in flats):
        raise ZeroHandoffError(f"ILA: the training's optimizer already holds a state; {checkpoint} must be applied before any step")
    step = saved["adam_step"]
    # torch's AdamW keeps its step on the CPU, fused or capturable on the weights' device.
    on_device = any(group.get("fused") or group.get("capturable") for group in inner.param_groups)
    for flat in flats:
        # AdamW's own lazy initialisation (zeros), at the warm-up's step.
        flat_step = step.to(flat.device if on_device else "cpu", copy=True) if torch.is_tensor(step) else step
        inner.state[flat] = {"step": flat_step, "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    link = getattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2 link each weight's view of the state after the first step; now
        link()
    for name, param in trainable:
        state = saved["params"][name]
        safe_set_full_fp32_param(param, state["fp32"])
        for key in MOMENTS:
            safe_set_full_optimizer_state(param, state[key], key)
        with _gathered_for_writing(param):  # the model's own (low-precision) copy of the weight
            param.data.copy_(state["fp32"].to(param.dtype).view_as(param))
    if len(saved["param_groups"]) != len(inner.param_groups):
        raise ZeroHandoffError(
            f"ILA: the training's optimizer has {len(inner.param_groups)} parameter groups, the warm-up's "
            f"{len(saved['param_groups'])} ({checkpoint}); the handover failed. Set ila_continue: false."
        )
    for group, warm in zip(inner.param_groups, saved["param_groups"]):
        for key, value in warm.items():
            if key in group:
                group[key] = value
    engine.global_steps = saved["global_steps"]
    engine.global_samples = saved["global_samples"]


def verify(engine: Any, checkpoint: str | Path) -> None:
    """Every rank, before the first step: the engine holds the warm-up's
    weights (fp32 masters and the model's copies), AdamW moments and step,
    and step counters. Raises ``ZeroHandoffError`` otherwise."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    saved = _load(checkpoint)
    trainable = _check_same_weights(engine, saved, checkpoint)

    def fail(what: str) -> None:
        raise ZeroHandoffError(
            f"ILA: the training's {what} is not the warm-up's ({checkpoint}); the handover failed. "
            f"Set ila_continue: false to train from fresh adapters."
        )

    for name, param in trainable:
        state = saved["params"][name]
        if not torch.equal(safe_get_full_fp32_param(param).float().cpu(), state["fp32"]):
            fail(f"fp32 master weight {name}")
        for key in MOMENTS:
            if not torch.equal(safe_get_full_optimizer_state(param, key).float().cpu(), state[key]):
                fail(f"AdamW {key} of {name}")
        with _gathered_for_reading(param):
            if not torch.equal(param.detach().cpu(), state["fp32"].to(param.dtype).view_as(param)):
                fail(f"weight {name}")
    inner = engine.optimizer.optimizer
    step = float(saved["adam_step"])
    if any(float(inner.state[flat]["step"]) != step for flat in _flat_partitions(engine.optimizer)):
        fail("AdamW step count")
    if engine.global_steps != saved["global_steps"]:
        fail(f"DeepSpeed step count ({engine.global_steps})")


def install_resume() -> None:
    """Let transformers' resume under DeepSpeed take a warm-up checkpoint.

    ``Trainer._prepare_for_training`` resumes a DeepSpeed run by calling
    ``transformers.trainer.deepspeed_load_checkpoint(engine, path, ...)``, which
    raises for a folder without DeepSpeed's ``global_step*/``. The wrap applies
    a warm-up checkpoint written under DeepSpeed (``is_zero_handoff``) with
    ``apply`` and hands every other path to the original, unchanged. Idempotent."""
    import transformers.trainer as hf_trainer

    original = hf_trainer.deepspeed_load_checkpoint
    if getattr(original, "ila_wrapped", False):
        return

    def deepspeed_load_checkpoint(deepspeed_engine, checkpoint_path, *args, **kwargs):
        if checkpoint_path is not None and is_zero_handoff(checkpoint_path):
            return apply(deepspeed_engine, checkpoint_path)
        if checkpoint_path is not None and (Path(checkpoint_path) / HANDOFF_NAME).is_file():
            raise ZeroHandoffError(
                f"ILA: {checkpoint_path} is a search warm-up's checkpoint written without DeepSpeed; a DeepSpeed "
                f"run cannot resume from it. Resume with the warm-up's engine, or use a fresh output_dir."
            )
        return original(deepspeed_engine, checkpoint_path, *args, **kwargs)

    deepspeed_load_checkpoint.ila_wrapped = True
    deepspeed_load_checkpoint.__wrapped__ = original
    hf_trainer.deepspeed_load_checkpoint = deepspeed_load_checkpoint
