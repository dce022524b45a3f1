"""Files written whole or not at all: a temp file beside the target, then a rename.

Readers see the old file or the new one, never half of one. A writer killed
between writing and renaming leaves a temp file whose name tells whether its
writer is gone (``.NAME.HOST.PID.RANDOM.tmp``); the next write of NAME removes it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

LOG = logging.getLogger("axolotl.ila")


def default_file_mode() -> int:
    """What ``open(..., "w")`` would give a new file (mkstemp makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# Temp files are ``.NAME.HOST.PID.RANDOM.tmp`` beside NAME: a writer killed between
# writing and renaming leaves one, and the name tells whether its writer is gone.
STALE_TEMP_AGE_S = 3600  # far beyond any JSON write; for writers we cannot ask (other hosts)


def temp_prefix(path: Path) -> str:
    return f".{path.name}.{socket.gethostname()}.{os.getpid()}."


def _writer_is_gone(temp: Path, name: str) -> bool:
    """True when ``temp`` is a leftover of ours: its writer process on this host
    has exited, or (other hosts, older unnamed temp files) it is over an hour old."""
    try:
        age = time.time() - temp.stat().st_mtime
    except FileNotFoundError:
        return False
    parts = temp.name[len(name) + 2 : -len(".tmp")].rsplit(".", 2)  # HOST, PID, RANDOM
    if len(parts) == 3 and parts[0] == socket.gethostname() and parts[1].isdigit():
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
    return age > STALE_TEMP_AGE_S


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files of killed writers of ``path``; never a live writer's."""
    path = Path(path)
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for temp in entries:
        if not (temp.name.startswith(f".{path.name}.") and temp.name.endswith(".tmp")):
            continue
        if _writer_is_gone(temp, path.name):
            try:
                temp.unlink()
                removed.append(temp)
            except FileNotFoundError:
                pass  # another process cleaned it first
            except OSError as exc:
                LOG.warning("ILA: could not remove the stale temp file %s (%s)", temp, exc.strerror)
    return removed


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a file so that readers see the old file or the new one, never half:
    ``write(temp)`` writes a temp file beside ``path``, which then replaces it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, default_file_mode())
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half."""

    def write(temp: Path) -> None:
        with temp.open("w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())

    write_atomic(path, write)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes so that readers see the old file or the new one, never half."""

    def write(temp: Path) -> None:
        with temp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    write_atomic(path, write)


def write_jsonl(path: str | Path, rows: list[dict[str, str]]) -> Path:
    return write_atomic(path, lambda temp: temp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"))
