"""The names the warm-up's checkpoint is written under, and its error."""

from __future__ import annotations

from pathlib import Path

HANDOFF_NAME = "ila_handoff.json"


ADAPTER_FILE = "adapter_model.safetensors"


# Where accelerate's FSDP resume reads a SHARDED_STATE_DICT checkpoint (FSDP_MODEL_NAME, OPTIMIZER_NAME).
FSDP_MODEL_DIR = "pytorch_model_fsdp_0"


FSDP_OPTIMIZER_DIR = "optimizer_0"


class HandoffError(RuntimeError):
    """The training did not start from the warm-up's state."""


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"
