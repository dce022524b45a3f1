"""The ranking file: a small JSON artifact people commit next to their configs.

    {"format": "axolotl-ila-ranking", "version": 1,
     "scorer": "ila_gate",
     "modules": [{"name": ..., "score": ..., "update_norm": ...}, ...],  # most important first
     "model": {"base_model": ..., "model_type": ..., "fingerprint": "sha256:...", ...},
     "search": {...}}

Loading validates everything a selection relies on and names the file in every
error; writing is atomic (temp file, then rename), and never replaces a file that
is not a ranking of the same architecture.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axolotl_ila.atomic import temp_prefix, write_json_atomic
from axolotl_ila.ranking.hub import HubError, fetch, is_hub_path, parse_hub_path

LOG = logging.getLogger("axolotl.ila")

FORMAT = "axolotl-ila-ranking"
VERSION = 1

# Per-module fields a ranking may carry; "score" is required, the others are
# extra scorers recorded by the same search and usable as ``ila_strategy``.
SCORE_FIELDS = ("score", "update_norm")


class RankingError(ValueError):
    """A ranking file that cannot be used, with the reason and the fix."""

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = problem or message


@dataclass
class ModuleScore:
    name: str
    score: float
    update_norm: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "score": self.score}
        if self.update_norm is not None:
            out["update_norm"] = self.update_norm
        return out


@dataclass
class Ranking:
    """Modules ordered most important first, plus where the ranking came from."""

    modules: list[ModuleScore]
    model: dict[str, Any]
    search: dict[str, Any] = field(default_factory=dict)
    scorer: str = "ila_gate"

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def fingerprint(self) -> str:
        return self.model["fingerprint"]

    def order(self, by: str = "score") -> list[str]:
        """Module names, most important first, by one of ``SCORE_FIELDS``.

        Ties keep the file's order, so an order is fully determined by the file.
        """
        if by == "score":
            return self.names
        if by not in SCORE_FIELDS:
            raise KeyError(by)
        missing = [m.name for m in self.modules if getattr(m, by) is None]
        if missing:
            raise RankingError(
                f"this ranking has no '{by}' scores (e.g. for {missing[0]}); it was not "
                f"made by a search that records them. Re-run `axolotl-ila search`."
            )
        ranked = sorted(enumerate(self.modules), key=lambda im: (-getattr(im[1], by), im[0]))
        return [m.name for _, m in ranked]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "scorer": self.scorer,
            "modules": [m.to_json() for m in self.modules],
            "model": self.model,
            "search": self.search,
        }

    @classmethod
    def from_scores(
        cls,
        scores: dict[str, float],
        model: dict[str, Any],
        search: dict[str, Any],
        update_norms: dict[str, float] | None = None,
        scorer: str = "ila_gate",
        module_order: list[str] | None = None,
    ) -> "Ranking":
        """Build a ranking from unordered scores; ties broken by model order."""
        order = module_order or list(scores)
        position = {name: i for i, name in enumerate(order)}
        names = sorted(scores, key=lambda n: (-scores[n], position.get(n, len(position))))
        modules = [
            ModuleScore(
                name=n,
                score=float(scores[n]),
                update_norm=None if update_norms is None else float(update_norms[n]),
            )
            for n in names
        ]
        return cls(modules=modules, model=model, search=search, scorer=scorer)


def _fail(path: str | os.PathLike, problem: str, fix: str) -> RankingError:
    return RankingError(f"ranking file {path}: {problem}. {fix}", problem=problem)


_REMAKE = "Re-run `axolotl-ila search CONFIG` to make a new one, or point `ila_ranking` at a valid ranking."


def parse_ranking(data: Any, path: str | os.PathLike = "<memory>") -> Ranking:
    """Validate the JSON content of a ranking file and build a ``Ranking``."""
    if not isinstance(data, dict):
        raise _fail(path, "is not a JSON object", _REMAKE)
    if data.get("format") != FORMAT:
        raise _fail(path, f"'format' is {data.get('format')!r}, not {FORMAT!r}; this is not an ILA ranking", _REMAKE)
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _fail(path, f"'version' must be an integer, got {version!r}", _REMAKE)
    if version > VERSION:
        raise _fail(
            path,
            f"version {version} is newer than this axolotl-ila understands ({VERSION})",
            "Upgrade axolotl-ila (`pip install -U axolotl-ila`).",
        )
    if version < 1:
        raise _fail(path, f"unknown version {version}", _REMAKE)

    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("fingerprint"), str):
        raise _fail(path, "'model' must be an object with a 'fingerprint' string", _REMAKE)
    search = data.get("search", {})
    if not isinstance(search, dict):
        raise _fail(path, "'search' must be an object", _REMAKE)
    scorer = data.get("scorer", "ila_gate")
    if not isinstance(scorer, str):
        raise _fail(path, "'scorer' must be a string", _REMAKE)

    entries = data.get("modules")
    if not isinstance(entries, list) or not entries:
        raise _fail(path, "'modules' must be a non-empty list", _REMAKE)
    modules: list[ModuleScore] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise _fail(path, f"modules[{i}] must be an object with a non-empty 'name'", _REMAKE)
        name = entry["name"]
        if name.startswith("base_model.model."):
            raise _fail(
                path,
                f"modules[{i}] is a PEFT-wrapped name ({name})",
                "Rankings use the base model's own module names; strip 'base_model.model.'.",
            )
        if name in seen:
            raise _fail(path, f"module {name} appears twice", _REMAKE)
        seen.add(name)
        values = {}
        for key in SCORE_FIELDS:
            value = entry.get(key)
            if value is None and key != "score":
                values[key] = None
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise _fail(path, f"modules[{i}] ({name}) has no finite '{key}' (got {value!r})", _REMAKE)
            values[key] = float(value)
        modules.append(ModuleScore(name=name, **values))

    for i in range(1, len(modules)):
        if modules[i].score > modules[i - 1].score:
            raise _fail(
                path,
                f"'modules' is not ordered most important first ({modules[i].name} scores "
                f"{modules[i].score} after {modules[i - 1].name} with {modules[i - 1].score})",
                "Sort 'modules' by descending score.",
            )
    return Ranking(modules=modules, model=model, search=search, scorer=scorer)


def load_ranking(path: str | os.PathLike, label: str | None = None) -> Ranking:
    """Read and validate a ranking: a local file, or ``hf://OWNER/REPO[@REVISION]/PATH.json``
    (fetched into the Hugging Face cache). ``label`` names the file in errors."""
    if is_hub_path(path):
        return load_ranking(locate_ranking(path).local_path, label=str(path))
    path = Path(path)
    name = label or path
    if not path.exists():
        raise RankingError(f"ranking file {name} does not exist. {_REMAKE}")
    if not path.is_file():
        raise _fail(name, "is not a file", "Point `ila_ranking` at a .json file.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(name, f"is not valid JSON ({exc})", _REMAKE) from exc
    return parse_ranking(data, name)


@dataclass(frozen=True)
class RankingFile:
    """Where a ranking is read from: what the user wrote (``spec``), the file on
    this machine, and for a Hub ranking the repo, revision and commit it came from."""

    spec: str
    local_path: Path
    hub: Any = None  # ranking.hub.HubFile

    def identity(self, ranking: Ranking) -> dict[str, Any]:
        """How a run records the ranking it used (``ila_selection.json``)."""
        out: dict[str, Any] = {"path": self.spec, "digest": file_digest(self.local_path), "fingerprint": ranking.fingerprint}
        if self.hub is not None:
            out["hub"] = self.hub.identity()
        return out


def locate_ranking(spec: str | os.PathLike) -> RankingFile:
    """A local path as it is (not checked here); an ``hf://`` path fetched into
    the Hugging Face cache, or a ``RankingError`` saying why not and what to do."""
    if is_hub_path(spec):
        try:
            hub_file = fetch(parse_hub_path(str(spec)))
        except HubError as exc:
            raise RankingError(str(exc), problem=exc.problem) from exc
        return RankingFile(spec=str(spec), local_path=hub_file.local_path, hub=hub_file)
    return RankingFile(spec=str(spec), local_path=Path(spec))


def check_architecture(
    ranking: Ranking,
    fingerprint: str,
    base_model: str | None,
    path: str | os.PathLike,
) -> list[str]:
    """Refuse a ranking made for another architecture; return warnings.

    The same architecture under another base-model id (a fine-tune of the same
    model, a local copy) is allowed, with a warning.
    """
    if ranking.fingerprint != fingerprint:
        made_for = ranking.model.get("base_model", "an unknown model")
        raise RankingError(
            f"ranking file {path} was made for another architecture ({made_for}, "
            f"{ranking.model.get('num_linear_modules', '?')} linear modules, fingerprint "
            f"{ranking.fingerprint[:19]}...) than this model ({base_model}, fingerprint "
            f"{fingerprint[:19]}...). Use a ranking made for this model, or set a new "
            f"`ila_ranking` path so that a search writes one."
        )
    warnings = []
    made_for = ranking.model.get("base_model")
    if base_model and made_for and made_for != base_model:
        warnings.append(
            f"ranking file {path} was made on {made_for}, this run uses {base_model}; "
            f"same architecture, so it is used as is."
        )
    return warnings


def check_writable(path: str | os.PathLike, fingerprint: str) -> None:
    """Raise unless ``path`` may receive a new ranking for ``fingerprint``.

    A missing file may be written; an existing one only if it is a valid ranking
    of the same architecture (a refreshed search). Anything else is the user's
    file and is left alone.
    """
    if is_hub_path(path):
        raise RankingError(
            f"{path} is on the Hugging Face Hub, which axolotl-ila does not write to. Write the ranking to a "
            f"local file (ila_ranking: rankings/NAME.json, or `-o` of `axolotl-ila combine`), then upload it "
            f"with `hf upload OWNER/REPO rankings/NAME.json rankings/NAME.json`."
        )
    path = Path(path)
    if path.is_dir():
        raise RankingError(f"ila_ranking {path} is a directory; give a file path such as {path / 'ranking.json'}.")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise RankingError(f"ila_ranking {path}: parent {parent} is not a directory.")
    check_can_create_in(path)
    if not path.exists():
        return
    try:
        existing = load_ranking(path)
    except RankingError as exc:
        raise RankingError(
            f"{path} exists and is not a valid ILA ranking ({exc.problem}), so it will not be "
            f"overwritten. Move it away, or write the ranking to another path (`ila_ranking`, "
            f"or `-o` of `axolotl-ila combine`)."
        ) from exc
    if existing.fingerprint != fingerprint:
        raise RankingError(
            f"{path} holds a ranking for another architecture "
            f"({existing.model.get('base_model')}); it will not be overwritten. "
            f"Write this model's ranking to another path (`ila_ranking`, or `-o`)."
        )


def file_digest(path: str | os.PathLike) -> str:
    """Identity of a file's exact bytes, as recorded next to a ranking's use."""
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_can_create_in(path: str | os.PathLike) -> None:
    """Raise unless a file can be created where ``path`` will be written.

    Tried for real (permissions, read-only mounts, root) in the nearest existing
    directory, so that a search is not run only to be lost when it is saved.
    """
    path = Path(path)
    directory = path.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        problem = f"creating a file in {directory} fails ({exc.strerror})"
        raise RankingError(
            f"cannot write {path}: {problem}. Make {directory} writable, or choose a path this "
            f"run can write (`ila_ranking`, e.g. under output_dir, or `-o` of `axolotl-ila combine`).",
            problem=problem,
        ) from exc


def save_ranking(ranking: Ranking, path: str | os.PathLike) -> None:
    check_writable(path, ranking.fingerprint)
    # Round-trip through the validator so that we never write a file we would refuse.
    parse_ranking(ranking.to_json(), path)
    write_json_atomic(path, ranking.to_json())
