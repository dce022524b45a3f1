"""The planted study's record: four JSON Lines files, one self-describing line
per finished piece, appended as the suite runs.

- ``truth.jsonl``: per task, its measured truth (``measure_truth``).
- ``sets.jsonl``: per task and set of modules, the held-out loss of LoRA on
  that set (shared by the strategies that choose the same set).
- ``searches.jsonl``: per task and search, the ranking file it wrote.
- ``results.jsonl``: per task and strategy, the top k, their loss and regret.

Every line carries the task (``PlantedTask.to_dict()``), the commit it was
run at and the date. A search is known by what it ran with, not by a name:
``{"by": "search", "settings": {...every ila_ key...}}`` (or
``{"by": "base_gradient", "batches": 4}``), and its ``search_key`` is a hash of
that. A result also says how the ranking was read (``order``: which score,
and after how many gate steps), and its ``key`` hashes both, so a table finds
a strategy's results by its settings and a strategy can be renamed freely.

A line is appended whole (one write, under a lock, then fsync); a reader warns
about and skips a torn last line, and the next append cuts it off.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

KINDS = ("truth", "sets", "searches", "results")


def search_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    """Every ``ila_`` key a search runs with: the args model's defaults (bar
    ``ila_ranking``, where the ranking is written), then ``overrides``.
    ``ila_relearn_steps``'s default (None) is resolved as the search resolves
    it for these configs (no DeepSpeed). ``"k/n"`` stays as written: the
    benchmark turns it into the task's k over its number of candidates."""
    from axolotl_ila.args import ILAArgs
    from axolotl_ila.runtime.engines import relearn_steps

    settings = {
        name: field.get_default(call_default_factory=True)
        for name, field in ILAArgs.model_fields.items()
        if name.startswith("ila_") and name != "ila_ranking"
    }
    unknown = set(overrides) - set(settings)
    if unknown:
        raise ValueError(f"not ila_ keys of the args model: {sorted(unknown)}")
    settings.update(overrides)
    if settings["ila_relearn_steps"] is None:
        settings["ila_relearn_steps"] = relearn_steps(settings)
    return dict(sorted(settings.items()))


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def search_key(search: dict[str, Any]) -> str:
    return digest(search)


def result_key(search: dict[str, Any], order: dict[str, Any]) -> str:
    return digest({"search": search, "order": order})


def _task_id(task: dict[str, Any]) -> str:
    return json.dumps(task, sort_keys=True)


def set_name(modules) -> str:
    return "|".join(sorted(modules))


_COMMIT: str | None = None


def commit() -> str:
    """The checked-out commit (short hash), with ``+changes`` when the package
    or the benchmarks differ from it; ``unknown`` outside a git checkout."""
    global _COMMIT
    if _COMMIT is None:
        root = Path(__file__).resolve().parents[2]
        try:
            head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
            changed = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no", "--", "axolotl_ila", "benchmarks", ":!benchmarks/planted/results"],
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            _COMMIT = head + ("+changes" if changed else "")
        except (OSError, subprocess.CalledProcessError):
            _COMMIT = "unknown"
    return _COMMIT


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines[-1]:
        warnings.warn(f"{path}: its last line is torn (a run stopped while writing it); skipped", stacklevel=2)
    out = []
    for number, line in enumerate(lines[:-1], 1):
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error})") from None
    return out


def append_line(path: Path, line: dict[str, Any]) -> None:
    """Append one whole line: under an exclusive lock (``--jobs`` runs tasks in
    processes side by side), after cutting off a torn last line, then fsync."""
    data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            end = size
            while end > 0:
                start = max(0, end - (1 << 16))
                newline = os.pread(fd, end - start, start).rfind(b"\n")
                if newline >= 0:
                    end = start + newline + 1
                    break
                end = start
            warnings.warn(f"{path}: cut off a torn last line ({size - end} bytes)", stacklevel=2)
            os.ftruncate(fd, end)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock


class Record:
    """The record in ``folder``, read once; ``add`` appends a line to its file
    and to what was read. Where a piece has several lines, the last counts."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.lines = {kind: read_lines(self.folder / f"{kind}.jsonl") for kind in KINDS}
        self._index = {kind: {} for kind in KINDS}
        for kind, lines in self.lines.items():
            for line in lines:
                self._index[kind][self._id(kind, line)] = line

    @staticmethod
    def _piece(kind: str, line: dict[str, Any]) -> str:
        if kind == "truth":
            return ""
        if kind == "sets":
            return set_name(line["modules"])
        if kind == "searches":
            return line["search_key"]
        return line["key"]

    def _id(self, kind: str, line: dict[str, Any]) -> tuple[str, str]:
        return _task_id(line["task"]), self._piece(kind, line)

    def get(self, kind: str, task: dict[str, Any], piece: str = "") -> dict[str, Any] | None:
        return self._index[kind].get((_task_id(task), piece))

    def add(self, kind: str, line: dict[str, Any]) -> dict[str, Any]:
        append_line(self.folder / f"{kind}.jsonl", line)
        self.lines[kind].append(line)
        self._index[kind][self._id(kind, line)] = line
        return line
