"""The selection record, ``OUTPUT_DIR/ila_selection.json``: which modules a run
trains, by which rule, from which ranking; and the check that a resumed run
still asks for the selection its checkpoints were trained with."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from axolotl_ila.args import output_dir
from axolotl_ila.selection import Selection, SelectionError

LOG = logging.getLogger("axolotl.ila")


RECORD_NAME = "ila_selection.json"


RECORD_FORMAT = "axolotl-ila-selection"


def is_resuming(cfg: Any) -> bool:
    if cfg.resume_from_checkpoint:
        return True
    return bool(cfg.auto_resume_from_checkpoints) and any(
        p.name.split("-")[-1].isdigit() for p in Path(output_dir(cfg)).glob("checkpoint-*")
    )


def read_record(path: Path) -> tuple[dict[str, Any], Selection]:
    """A run's ``ila_selection.json`` and its selection, or an error naming the file and the fix."""
    restore = f"Restore {path} from the run that wrote it, or start a fresh output_dir."
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SelectionError(f"{path} is not valid JSON ({exc}); it may have been cut short. {restore}") from exc
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise SelectionError(f"{path} is not an ILA selection record. {restore}")
    try:
        selection = Selection(
            kept=tuple(record["kept"]),
            dropped=tuple(record["dropped"]),
            strategy=str(record["strategy"]),
            mode=str(record["mode"]),
            fraction=float(record["fraction"]),
            groups=tuple(record.get("groups", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SelectionError(f"{path} has no valid {exc} entry. {restore}") from exc
    return record, selection


def same_rule(a: Selection, b: Selection) -> bool:
    """Same strategy, mode, fraction and whole groups (the modules may differ)."""
    return (a.strategy, a.mode, set(a.groups)) == (b.strategy, b.mode, set(b.groups)) and math.isclose(
        a.fraction, b.fraction
    )


def recorded_selection(cfg: Any, info: Any, requested: Selection, current: Selection | None) -> tuple[Selection, dict[str, Any] | None]:
    """The recorded selection of the run being resumed and the identity of its
    ranking, if the config still asks for it: the same rule (``requested``) in
    every case and, where the config's ranking can be read (``current``), the
    same modules too. ``info``: the model's ``candidates.ModelInfo``."""
    path = Path(cfg.output_dir) / RECORD_NAME
    if not path.exists():
        raise SelectionError(
            f"resuming in {cfg.output_dir}, which has no {RECORD_NAME}: its checkpoints were not "
            f"trained with an ILA selection, so their adapters would not fit. Resume without the "
            f"ILA plugin, or start a fresh output_dir."
        )
    record, selection = read_record(path)
    if record.get("model_fingerprint") != info.fingerprint:
        raise SelectionError(
            f"{path} records a selection for another architecture than {cfg.base_model}; "
            f"resume with the base model the run started with."
        )
    asked = current or requested
    if not same_rule(requested, selection) or (current is not None and set(current.kept) != set(selection.kept)):
        raise SelectionError(
            f"resuming in {cfg.output_dir}: the config now selects {len(asked.kept)} modules "
            f"({asked.strategy}, {asked.mode} {asked.fraction:g}) but the checkpoints were trained "
            f"on {len(selection.kept)} ({selection.strategy}, {selection.mode} {selection.fraction:g}, "
            f"recorded in {path}); their adapters would not fit. Restore the ILA settings of that "
            f"run (ila_strategy, fractions, ila_ranking, ila_fused_groups), or start a fresh output_dir."
        )
    LOG.info("ILA: resuming with the selection recorded in %s", path)
    return selection, record.get("ranking")
