"""The warm-up's checkpoints in a run's output_dir: found, aligned with the
training's own settings before it loads them, and removed after a training
that saves no checkpoints."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from axolotl_ila.atomic import write_json_atomic
from axolotl_ila.handoff.names import HANDOFF_NAME

LOG = logging.getLogger("axolotl.ila")


def handoff_checkpoints(output_dir: str | Path) -> list[Path]:
    """The warm-up checkpoints in ``output_dir``: ``checkpoint-<k>`` folders that
    hold our ``ila_handoff.json`` for that very step (the training's own
    checkpoints have none)."""
    found = []
    for folder in sorted(Path(output_dir).glob("checkpoint-*")):
        step = folder.name.rsplit("-", 1)[-1]
        marker = folder / HANDOFF_NAME
        if not (step.isdigit() and marker.is_file()):
            continue
        try:
            recorded = json.loads(marker.read_text(encoding="utf-8")).get("step")
        except (OSError, ValueError, AttributeError):
            continue
        if recorded == int(step):
            found.append(folder)
    return found


def align_with_training(checkpoint: Path, args: Any, train_batch_size: int | None) -> None:
    """Make the checkpoint's trainer state say what the training's own would:
    its logging, evaluation and saving intervals, as transformers computes them
    (``TrainerState.compute_steps``), and its batch size. Otherwise resuming from
    it warns that "the following arguments do not match the ones in the
    trainer_state.json" (the warm-up logged every step). Main process only."""
    from transformers import TrainerState

    path = checkpoint / "trainer_state.json"
    state = TrainerState.load_from_json(str(path))
    state.compute_steps(args, state.max_steps)  # the warm-up kept the training's max_steps
    if train_batch_size is not None:
        state.train_batch_size = train_batch_size
    write_json_atomic(path, dataclasses.asdict(state))


def remove_after_training(output_dir: str | Path, save_strategy: Any) -> list[Path]:
    """After a finished training: remove the warm-up checkpoints of a run that
    saves none of its own, where they are only optimizer state nobody asked for.
    With checkpoints on they stay, as the run's first. Main process only."""
    removed = []
    for checkpoint in handoff_checkpoints(output_dir):
        if str(getattr(save_strategy, "value", save_strategy)).lower() != "no":
            LOG.info(
                "ILA: keeping the warm-up's checkpoint %s as the run's first checkpoint (save_strategy: %s)",
                checkpoint,
                getattr(save_strategy, "value", save_strategy),
            )
            continue
        shutil.rmtree(checkpoint)
        removed.append(checkpoint)
        LOG.info(
            "ILA: removed the warm-up's checkpoint %s: the training finished and saves no checkpoints "
            "(save_strategy: no), so nothing resumes from it",
            checkpoint,
        )
    return removed
