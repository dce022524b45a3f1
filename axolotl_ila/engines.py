"""Which distributed engine a config trains under, and what ILA does there.

docs/multi-gpu.md has the whole matrix. In short: one process, DDP and FSDP2
run everything that is tested; FSDP1 and DeepSpeed are refused at config load,
before any work, because no test here has run them (accelerate starts neither
FSDP1's flat parameters nor DeepSpeed on CPU processes, and CI has no GPU).

The functions read a raw config dict (before validation) or axolotl's
validated config alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SHARDED = "SHARDED_STATE_DICT"
FULL = "FULL_STATE_DICT"


def _fsdp_block(cfg: Any) -> Mapping | None:
    block = cfg.get("fsdp_config")
    return block if isinstance(block, Mapping) else None


def fsdp_version(cfg: Any) -> int | None:
    """1 or 2 for an FSDP run (axolotl's default is 1), None without FSDP."""
    block = _fsdp_block(cfg)
    if block is None and not cfg.get("fsdp") and not cfg.get("fsdp_config"):
        return None
    version = cfg.get("fsdp_version")
    if version is None and block is not None:
        version = block.get("fsdp_version", block.get("version"))
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


def engine_refusal(cfg: Any) -> str | None:
    """Why ILA refuses this config's engine, or None."""
    name = engine(cfg)
    if name == "deepspeed":
        return (
            "axolotl_ila.ILAPlugin does not support DeepSpeed (deepspeed: ...): no test has run ILA under "
            "ZeRO-2 or ZeRO-3 (accelerate does not start DeepSpeed on CPU processes, and the project's CI "
            "has no GPU), and ZeRO partitions the weights the search gates and the selection freezes. "
            "Shard with FSDP2 instead (fsdp_version: 2 and an fsdp_config block), which is tested; "
            "see docs/multi-gpu.md"
        )
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
    if engine(cfg) == "fsdp2" and fsdp_state_dict_type(cfg) != SHARDED:
        return (
            f"under FSDP2 the warm-up hands over as a checkpoint the engine resumes from, and with "
            f"fsdp_config.state_dict_type: {fsdp_state_dict_type(cfg)} (transformers' default when unset) accelerate "
            f"saves and restores a LoRA adapter as rank 0's shards only, so the other ranks would not start "
            f"from the warm-up. Set fsdp_config.state_dict_type: {SHARDED}"
        )
    return None
