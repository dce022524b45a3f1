"""Write the warm-up's state of the kept modules as the training run's first
checkpoint: one process (DDP, one GPU, DeepSpeed) or every rank's shards (FSDP2)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from axolotl_ila.atomic import write_json_atomic
from axolotl_ila.handoff.names import ADAPTER_FILE, FSDP_MODEL_DIR, FSDP_OPTIMIZER_DIR, HANDOFF_NAME, HandoffError, checkpoint_dir
from axolotl_ila.handoff.state import WarmState, lora_module_of
from axolotl_ila.handoff.zero import ZERO_STATE_FILE

LOG = logging.getLogger("axolotl.ila")


def _check_free(final: Path, output_dir: str | Path) -> None:
    if final.exists():
        raise HandoffError(
            f"{final} already exists, from an earlier run in output_dir {output_dir}; the warm-up "
            f"cannot hand over to the training there. Use a fresh output_dir, or resume that run "
            f"(auto_resume_from_checkpoints: true)."
        )


def _write_common(warm: WarmState, kept: list[str], dropped: list[str], folder: Path, exclude: Any, names: list[str]) -> None:
    """The adapter, scheduler, trainer state and handover record, into ``folder``."""
    from safetensors.torch import save_file

    kept_set = set(kept)
    adapter = {k: v.contiguous() for k, v in warm.adapter.items() if lora_module_of(k) in kept_set}
    missing = kept_set - {lora_module_of(k) for k in adapter}
    if missing:
        raise HandoffError(f"the warm-up has no LoRA weights for {len(missing)} kept modules, e.g. {sorted(missing)[0]}")
    save_file(adapter, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
    write_json_atomic(folder / "adapter_config.json", {**warm.adapter_config, "exclude_modules": exclude})
    torch.save(warm.scheduler, folder / "scheduler.pt")
    write_json_atomic(folder / "trainer_state.json", warm.trainer_state)
    write_json_atomic(
        folder / HANDOFF_NAME,
        {"step": warm.step, "kept": list(kept), "dropped": list(dropped), "optimizer_params": names},
    )


def write_checkpoint(warm: WarmState, kept: list[str], dropped: list[str], output_dir: str | Path, exclude: Any) -> Path:
    """Write the warm-up state of the kept modules as ``checkpoint-<step>``,
    atomically (a temp folder, then rename). Main process only; for a sharded
    warm-up (FSDP2) every process calls ``write_sharded_checkpoint`` instead."""
    final = checkpoint_dir(output_dir, warm.step)
    _check_free(final, output_dir)
    kept_set = set(kept)
    if warm.zero is not None:  # DeepSpeed: per-parameter state, applied by zero_handoff.apply
        optimizer = warm.zero.kept_only(lambda name: lora_module_of(name) in kept_set)
        optimizer_file, names = ZERO_STATE_FILE, list(optimizer["params"])
    else:
        optimizer, names = warm.optimizer_state_dict(kept_set)
        optimizer_file = "optimizer.pt"
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_common(warm, kept, dropped, tmp, exclude, names)
        torch.save(optimizer, tmp / optimizer_file)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_sharded_checkpoint(warm: WarmState, kept: list[str], dropped: list[str], output_dir: str | Path, exclude: Any) -> Path:
    """FSDP2: every process writes its shards of the kept modules' LoRA weights
    and optimizer state with ``torch.distributed.checkpoint``, in the layout of
    accelerate's SHARDED_STATE_DICT checkpoints; the main process adds the rest
    and renames the temp folder. Called by every process."""
    import torch.distributed.checkpoint as dcp

    from axolotl_ila.runtime.distributed import barrier, on_main

    assert warm.sharded is not None
    final = checkpoint_dir(output_dir, warm.step)
    tmp = final.with_name(f".{final.name}.sharded.tmp")  # one name for every rank

    def prepare() -> None:
        _check_free(final, output_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    on_main(prepare)  # the main process's error stops every rank
    adapter, optimizer, names = warm.sharded.kept_only(set(kept))
    try:
        dcp.save({"model": adapter}, storage_writer=dcp.FileSystemWriter(str(tmp / FSDP_MODEL_DIR)))
        dcp.save({"optimizer": optimizer}, storage_writer=dcp.FileSystemWriter(str(tmp / FSDP_OPTIMIZER_DIR)))
    finally:
        barrier()

    def finish() -> None:
        try:
            _write_common(warm, kept, dropped, tmp, exclude, names)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    on_main(finish)
    return final


