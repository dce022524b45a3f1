"""The warm-up's state, captured from its trainer for the training to continue
from: LoRA weights and AdamW moments, whole (one process, DDP), as shards
(FSDP2), or per parameter (DeepSpeed ZeRO, ``handoff.zero``)."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch

from axolotl_ila.architecture import strip_peft_prefix
from axolotl_ila.handoff.zero import ZeroWarmState, is_deepspeed_trainer
from axolotl_ila.runtime.distributed import is_sharded

LOG = logging.getLogger("axolotl.ila")


def lora_module_of(param_name: str) -> str:
    """``base_model.model.<module>.lora_A.default.weight`` -> ``<module>``."""
    return strip_peft_prefix(param_name.split(".lora_")[0])


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, on the CPU. For a DTensor this is a collective: every
    rank must call it, for the same tensors in the same order."""
    tensor = tensor.detach()
    if is_sharded(tensor):
        tensor = tensor.full_tensor()
    return tensor.cpu().clone()


@dataclass
class ShardedWarmState:
    """FSDP2: this rank's shards of the warm-up's LoRA weights (PEFT's saved
    keys) and optimizer state (``get_optimizer_state_dict``: parameter names)."""

    adapter: dict[str, Any]
    optimizer: dict[str, Any]

    @classmethod
    def capture(cls, model: Any, optimizer: Any, adapter: dict[str, Any]) -> "ShardedWarmState":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=False))
        state = {
            "state": {n: {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in s.items()} for n, s in state["state"].items()},
            "param_groups": [dict(group) for group in state["param_groups"]],
        }
        return cls(adapter={k: v.detach().clone() for k, v in adapter.items()}, optimizer=state)

    def kept_only(self, kept: set[str]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        """The kept modules' shards: adapter, optimizer state dict, and the
        optimizer's parameter names in order."""
        adapter = {k: v for k, v in self.adapter.items() if lora_module_of(k) in kept}
        groups, names = [], []
        for group in self.optimizer["param_groups"]:
            members = [n for n in group["params"] if lora_module_of(n) in kept]
            names.extend(members)
            groups.append({**group, "params": members})
        state = {n: s for n, s in self.optimizer["state"].items() if lora_module_of(n) in kept}
        return adapter, {"state": state, "param_groups": groups}, names


@dataclass
class WarmState:
    """Everything the training needs from the warm-up, on the CPU."""

    step: int
    adapter: dict[str, torch.Tensor]  # PEFT's saved keys (no adapter name) -> tensor
    adapter_config: dict[str, Any]
    optimizer_groups: list[dict[str, Any]]  # hyper-parameters, and "names" instead of "params"
    optimizer_state: dict[str, dict[str, Any]]  # parameter name -> its state
    scheduler: dict[str, Any]
    trainer_state: dict[str, Any]
    sharded: ShardedWarmState | None = None  # FSDP2: this rank's shards, for the engine's resume
    zero: ZeroWarmState | None = None  # DeepSpeed ZeRO: whole fp32 weights and moments, per parameter

    @classmethod
    def capture(cls, trainer: Any) -> "WarmState":
        if is_deepspeed_trainer(trainer):
            return cls._capture_zero(trainer)
        from peft import get_peft_model_state_dict

        model = trainer.model
        peft_state = get_peft_model_state_dict(model)
        # Whole tensors on every rank (a collective under FSDP2: every rank captures).
        adapter = {k: full(v) for k, v in peft_state.items()}
        name_of = {id(p): n for n, p in model.named_parameters()}
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
        sharded = None
        if any(is_sharded(v) for v in peft_state.values()):
            sharded = ShardedWarmState.capture(model, optimizer, peft_state)
        groups, state = [], {}
        for group in optimizer.param_groups:
            names = [name_of[id(p)] for p in group["params"]]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "names": names})
            if sharded is not None:
                continue  # the optimizer state travels as shards
            for p, n in zip(group["params"], names):
                if p in optimizer.state:
                    state[n] = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in optimizer.state[p].items()}
        return cls(
            adapter=adapter,
            optimizer_groups=groups,
            optimizer_state=state,
            sharded=sharded,
            **_trainer_parts(trainer),
        )

    @classmethod
    def _capture_zero(cls, trainer: Any) -> "WarmState":
        """DeepSpeed ZeRO: every rank gathers each trainable LoRA weight's fp32
        master and moments (collectives); the adapter is the masters in the
        model's precision, which is what ZeRO copies into the model after a step."""
        zero = ZeroWarmState.capture(trainer)
        dtypes = {n: p.dtype for n, p in trainer.model.named_parameters()}
        adapter = {saved_key(n): s["fp32"].to(dtypes[n]) for n, s in zero.params.items()}
        return cls(adapter=adapter, optimizer_groups=[], optimizer_state={}, zero=zero, **_trainer_parts(trainer))

    def optimizer_state_dict(self, kept: set[str]) -> tuple[dict[str, Any], list[str]]:
        """A ``torch.optim`` state dict for the kept parameters only, numbered as
        the training's optimizer will number them; and their names, in order."""
        groups, state, names = [], {}, []
        for group in self.optimizer_groups:
            members = [n for n in group["names"] if lora_module_of(n) in kept]
            indices = list(range(len(names), len(names) + len(members)))
            for index, name in zip(indices, members):
                if name in self.optimizer_state:
                    state[index] = self.optimizer_state[name]
            names.extend(members)
            groups.append({**{k: v for k, v in group.items() if k != "names"}, "params": indices})
        return {"state": state, "param_groups": groups}, names


def saved_key(param_name: str) -> str:
    """PEFT's saved key of a LoRA weight: the parameter's name without the adapter's."""
    return param_name.replace(".default.", ".", 1)


def _trainer_parts(trainer: Any) -> dict[str, Any]:
    """The step, adapter config, scheduler and trainer state, under any engine."""
    from transformers import TrainerControl

    model = trainer.model
    trainer_state = json.loads(json.dumps(dataclasses.asdict(trainer.state), default=str))
    # The warm-up's stop flag is not the training's; the training's own
    # stateful callbacks get their fresh state at its start (HandoffCheck).
    trainer_state["stateful_callbacks"] = {"TrainerControl": TrainerControl().state()}
    trainer_state["best_model_checkpoint"] = None
    peft_config = model.peft_config[getattr(model, "active_adapter", "default")]
    return {
        "step": int(trainer.state.global_step),
        "adapter_config": json.loads(json.dumps(peft_config.to_dict(), default=list)),
        "scheduler": trainer.lr_scheduler.state_dict(),
        "trainer_state": trainer_state,
    }
