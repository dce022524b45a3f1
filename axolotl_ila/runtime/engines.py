"""Which distributed engine a config trains under, and what ILA does there.

docs/multi-gpu.md has the whole matrix. In short: one process, DDP and FSDP2
run everything that is tested; DeepSpeed ZeRO-2 and ZeRO-3 run LoRA, QLoRA and
full fine-tuning with a cached ranking and with the search, and LoRA and QLoRA
continue the training from the warm-up (``zero_handoff``). What no test here
has run is refused at config load, before any work: FSDP1, other ZeRO stages,
and under DeepSpeed 8-bit models (``load_in_8bit``), a preference loss
(``rl:``), ``ila_gate_train_lora`` and ``ila_relearn_steps`` above 0 (the
search runs without the re-learning check there by default); the continuation
also with a DeepSpeed config's own optimizer or scheduler, or
``lora_modules_to_save``.

The functions read a raw config dict (before validation) or axolotl's
validated config alike.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SHARDED = "SHARDED_STATE_DICT"
FULL = "FULL_STATE_DICT"
DEFAULT_RELEARN_STEPS = 32  # ila_relearn_steps where DeepSpeed does not rule it out


def _fsdp_block(cfg: Any) -> Mapping | None:
    block = cfg.get("fsdp_config")
    return block if isinstance(block, Mapping) else None


@functools.cache
def default_fsdp_version() -> int:
    """The FSDP version of a config that names none: the installed axolotl's
    schema default for ``fsdp_version``. axolotl 0.19 has none (accelerate then
    runs FSDP1); 0.20+ has 2 (it removed FSDP1)."""
    from axolotl.utils.schemas.config import AxolotlInputConfig

    return 2 if str(AxolotlInputConfig.model_fields["fsdp_version"].default) == "2" else 1


def fsdp_version(cfg: Any) -> int | None:
    """1 or 2 for an FSDP run (unset: ``default_fsdp_version``), None without FSDP."""
    block = _fsdp_block(cfg)
    if block is None and not cfg.get("fsdp") and not cfg.get("fsdp_config"):
        return None
    version = cfg.get("fsdp_version")
    if version is None and block is not None:
        version = block.get("fsdp_version", block.get("version"))
    if version is None:
        return default_fsdp_version()
    return 2 if str(version) == "2" else 1


def fsdp_state_dict_type(cfg: Any) -> str:
    """The checkpoint layout of an FSDP run. Unset, transformers' trainer (which
    axolotl trains with) makes it FULL_STATE_DICT."""
    block = _fsdp_block(cfg) or {}
    value = block.get("state_dict_type", block.get("fsdp_state_dict_type"))
    return str(value) if value else FULL


def engine(cfg: Any) -> str | None:
    """``"fsdp2"``, ``"fsdp1"``, ``"deepspeed"``, or None (one process or DDP)."""
    if cfg.get("deepspeed"):
        return "deepspeed"
    version = fsdp_version(cfg)
    if version is not None:
        return f"fsdp{version}"
    return None


def _deepspeed_block(cfg: Any) -> Mapping | None:
    """The ``deepspeed:`` config (a JSON file's path or the dict itself), or None."""
    block = cfg.get("deepspeed")
    if isinstance(block, (str, Path)):
        try:
            block = json.loads(Path(block).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    return block if isinstance(block, Mapping) else None


def deepspeed_stage(cfg: Any) -> int | None:
    """The ZeRO stage of ``deepspeed:`` (a JSON file's path or the dict itself);
    None when it cannot be read."""
    block = _deepspeed_block(cfg)
    if block is None:
        return None
    zero = block.get("zero_optimization")
    stage = zero.get("stage", 0) if isinstance(zero, Mapping) else 0
    try:
        return int(stage)
    except (TypeError, ValueError):
        return None


def _deepspeed_refusal(cfg: Any) -> str | None:
    stage = deepspeed_stage(cfg)
    if stage is None:
        return (
            f"axolotl_ila.ILAPlugin could not read the ZeRO stage of deepspeed: {cfg.get('deepspeed')!r} "
            f"(zero_optimization.stage in a readable JSON file, or the dict itself); ILA supports ZeRO-2 "
            f"and ZeRO-3 only. Point deepspeed: at the JSON file, e.g. axolotl's deepspeed_configs/zero2.json"
        )
    if stage not in (2, 3):
        return (
            f"axolotl_ila.ILAPlugin supports DeepSpeed ZeRO-2 and ZeRO-3 only (zero_optimization.stage: 2 "
            f"or 3), not stage {stage}: no test has run ILA under it. Use a ZeRO-2 or ZeRO-3 config "
            f"(axolotl's deepspeed_configs/zero2.json, zero3.json), or DDP; see docs/multi-gpu.md"
        )
    if cfg.get("load_in_8bit"):
        return (
            "axolotl_ila.ILAPlugin does not support 8-bit models (load_in_8bit) under DeepSpeed: no test has run "
            "them (the tests run QLoRA's 4-bit base under ZeRO-2 and ZeRO-3). Use adapter: qlora (4-bit) or "
            "adapter: lora; see docs/multi-gpu.md"
        )
    if cfg.get("rl"):
        rl = cfg.get("rl")
        return (
            f"axolotl_ila.ILAPlugin does not support a preference loss (rl: {getattr(rl, 'value', rl)}) under "
            f"DeepSpeed: no test has run one (the DeepSpeed tests train the supervised loss). Remove deepspeed: "
            f"for the preference run (one process or DDP), or train the supervised loss under DeepSpeed"
        )
    why = (
        "no test has run it; it steps the LoRA weights beside the gates with an optimizer of its own on "
        "param.grad and the parameters themselves, which under ZeRO are managed by DeepSpeed's gradient hooks "
        "(ZeRO-3: partitioned, empty outside a forward)"
    )
    if cfg.get("ila_gate_train_lora"):
        return (
            f"ila_gate_train_lora: true is not supported under DeepSpeed: {why}. Remove ila_gate_train_lora (the "
            f"gates then train with LoRA frozen, as tested under ZeRO-2 and ZeRO-3)"
        )
    relearn = cfg.get("ila_relearn_steps")
    if relearn:
        return (
            f"ila_relearn_steps: {relearn} is not supported under DeepSpeed: the re-learning check trains LoRA "
            f"beside the gates, and {why}. Remove ila_relearn_steps (under DeepSpeed the search then runs "
            f"without the check, as with ila_relearn_steps: 0)"
        )
    return None


def relearn_steps(cfg: Any) -> int:
    """``ila_relearn_steps``, or its default: 32, and 0 under DeepSpeed (where an
    explicit value above 0 is refused at config load)."""
    value = cfg.get("ila_relearn_steps")
    if value is not None:
        return int(value)
    return 0 if engine(cfg) == "deepspeed" else DEFAULT_RELEARN_STEPS


def engine_refusal(cfg: Any) -> str | None:
    """Why ILA refuses this config's engine, or None."""
    name = engine(cfg)
    if name == "deepspeed":
        return _deepspeed_refusal(cfg)
    if name == "fsdp1":
        return (
            "axolotl_ila.ILAPlugin supports FSDP version 2 only (fsdp_version: 2): FSDP1 flattens the "
            "parameters of each wrapped block into one, so the search's gates and the selection's frozen "
            "weights are not the tensors ILA tests; axolotl deprecates FSDP1 too. Set fsdp_version: 2; "
            "see docs/multi-gpu.md"
        )
    return None


def continuation_refusal(cfg: Any) -> str | None:
    """Why the engine cannot continue the training from the warm-up, or None."""
    if engine(cfg) == "deepspeed":
        own = [key for key in ("optimizer", "scheduler") if key in (_deepspeed_block(cfg) or {})]
        if own:
            return (
                f"under DeepSpeed the warm-up hands over torch AdamW's state and transformers' learning-rate "
                f"schedule (zero_handoff), and this DeepSpeed config brings its own {' and '.join(own)} "
                f"({', '.join(own)} in {cfg.get('deepspeed')!r}), which no test has run with the handover. Remove "
                f"{' and '.join(own)} from the DeepSpeed config (the trainer's own are used, as in axolotl's "
                f"deepspeed_configs/zero2.json and zero3.json)"
            )
        if cfg.get("lora_modules_to_save"):
            return (
                "under DeepSpeed the warm-up hands over LoRA weights only, and lora_modules_to_save trains whole "
                "copies of other modules too, whose handover is not built. Remove lora_modules_to_save, or train "
                "with DDP or FSDP2"
            )
        return None
    if engine(cfg) == "fsdp2" and fsdp_state_dict_type(cfg) != SHARDED:
        return (
            f"under FSDP2 the warm-up hands over as a checkpoint the engine resumes from, and with "
            f"fsdp_config.state_dict_type: {fsdp_state_dict_type(cfg)} (transformers' default when unset) accelerate "
            f"saves and restores a LoRA adapter as rank 0's shards only, so the other ranks would not start "
            f"from the warm-up. Set fsdp_config.state_dict_type: {SHARDED}"
        )
    return None
