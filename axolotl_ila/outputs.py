"""What a run writes beside its outputs: the selection record with a copy of
the ranking it came from, a searched ranking (at ``ila_ranking``, or in
``output_dir`` when that path has become unwritable), its heatmap, and the
model card's note. Main process only."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from axolotl_ila.args import output_dir
from axolotl_ila.atomic import write_bytes_atomic, write_json_atomic
from axolotl_ila.ranking.file import Ranking, RankingError, RankingFile, check_writable, load_ranking, save_ranking
from axolotl_ila.record import RECORD_NAME, read_record
from axolotl_ila.selection import SelectionError

LOG = logging.getLogger("axolotl.ila")


# The copy of the ranking a training used, beside the record in output_dir, so
# that the adapter's folder (and what hub_model_id pushes) carries it. A searched
# ranking that ``ila_ranking`` cannot take after the search is written there too.
RANKING_COPY_NAME = "ila_ranking.json"


FALLBACK_RANKING_NAME = RANKING_COPY_NAME


def save_searched(ranking: Ranking, path: Path, output_dir: str | Path) -> Path:
    """Write a searched ranking to ``ila_ranking`` (checked writable before the
    search). If that still fails (the directory changed, another file appeared
    there), write it under ``output_dir``: a search is never lost. Returns where."""
    try:
        save_ranking(ranking, path)
        LOG.info("ILA: wrote ranking %s", path)
        return path
    except RankingError as exc:
        error, reason = exc, exc.problem
    except OSError as exc:
        error, reason = exc, exc.strerror or str(exc)
    fallback = Path(output_dir) / FALLBACK_RANKING_NAME
    if fallback.resolve() == path.resolve():
        raise error
    try:
        save_ranking(ranking, fallback)
    except (OSError, RankingError) as second:
        raise RankingError(
            f"the search finished, but its ranking could be written neither to ila_ranking {path} "
            f"({reason}) nor to {fallback} ({second})."
        ) from error
    LOG.warning(
        "ILA: the search finished, but its ranking could not be written to ila_ranking %s (%s). "
        "It is saved in %s instead, and this run trains with it; copy it to %s (or point "
        "ila_ranking at it) so that later runs reuse it instead of searching again.",
        path, reason, fallback, path,
    )
    return fallback


def write_heatmap(ranking: Ranking, ranking_path: Path, fractions: dict[str, Any]) -> None:
    """The ranking's picture next to it (``ranking.png``), at the run's fractions
    (``args.selection_kwargs``)."""
    from axolotl_ila.report.heatmap import heatmap

    png = ranking_path.with_suffix(".png")
    if png.exists() and png.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        LOG.warning("ILA: %s exists and is not a PNG; not overwriting it with the heatmap", png)
        return
    try:
        heatmap(ranking, png, **fractions)
    except SelectionError:
        # The run's fraction does not apply to every module set (e.g. combined
        # rankings); draw the default drop 25% instead.
        heatmap(ranking, png)
    LOG.info("ILA: heatmap %s", png)


def write_record(plan: Any, output_dir: str | Path) -> Path:
    """``ila_selection.json`` in ``output_dir``, and beside it a copy of the
    ranking the selection came from (``ila_ranking.json``), which the record names.
    Main process only."""
    if plan.ranking_file is not None and (plan.ranking_identity or {}).get("copy"):
        copy_ranking(plan.ranking_file, output_dir)
    path = Path(output_dir) / RECORD_NAME
    write_json_atomic(path, plan.record())
    return path


def carry_into_merged(adapter_dir: str | Path, merged_dir: str | Path) -> list[Path]:
    """The selection record beside a trained adapter, and the ranking copy it
    names, copied byte for byte into the folder of the model merged from that
    adapter (``axolotl merge-lora``), so that the merged model still says which
    modules its update covers and why. Returns the files written; an empty
    list where ``adapter_dir`` has no record (an adapter trained without ILA)."""
    source = Path(adapter_dir) / RECORD_NAME
    if not source.is_file():
        return []
    record, _ = read_record(source)
    names = [RECORD_NAME]
    copy = (record.get("ranking") or {}).get("copy")
    if copy:
        if not (Path(adapter_dir) / copy).is_file():
            raise SelectionError(
                f"{source} names the ranking copy {copy}, which is not in {adapter_dir}; copy the ranking the "
                f"training used there as {copy} (its sha256 is in the record) and merge again"
            )
        names.append(copy)
    written = []
    for name in names:
        target = Path(merged_dir) / name
        write_bytes_atomic(target, (Path(adapter_dir) / name).read_bytes())
        written.append(target)
    return written


def model_card_note(plan: Any, cfg: Any) -> str:
    """A few lines for the model card: what the adapter covers, chosen how, and
    the files in the folder that say which modules and why."""
    selection = plan.selection
    kept, total = len(selection.kept), len(selection.kept) + len(selection.dropped)
    how = f"`ila_strategy: {selection.strategy}`, {selection.mode} {selection.fraction:g}"
    if selection.strategy == "ila":
        chosen = f"chosen by ILA layer importance ([arXiv 2410.17875](https://arxiv.org/abs/2410.17875); {how})"
    else:
        chosen = f"chosen by axolotl-ila ({how})"
    what = (
        f"The LoRA adapter covers {kept} of the {total} candidate modules"
        if cfg.adapter
        else f"The training updated {kept} of the {total} candidate linear modules (the others stayed frozen)"
    )
    lines = ["## Layer selection (axolotl-ila)", "", f"{what}, {chosen}."]
    identity = plan.ranking_identity or {}
    if identity.get("copy"):
        origin = f", from `{identity['path']}`" if identity.get("hub") else ""
        lines.append(f"The ranking that chose them is `{identity['copy']}`{origin}; the kept and dropped modules are listed in `{RECORD_NAME}`.")
    else:
        lines.append(f"The kept and dropped modules are listed in `{RECORD_NAME}`.")
    return "\n".join(lines)


def check_copy_target(cfg: Any, source: RankingFile, fingerprint: str) -> None:
    """Before any expensive work: the ranking's copy can go to ``output_dir``
    (nothing there, the ranking itself, or an earlier copy of this architecture's
    ranking; never a file of the user's)."""
    target = Path(output_dir(cfg)) / RANKING_COPY_NAME
    if target.exists() and source.local_path.exists() and target.samefile(source.local_path):
        return
    try:
        check_writable(target, fingerprint)
    except RankingError as exc:
        raise RankingError(
            f"ILA copies the ranking a training uses into output_dir as {RANKING_COPY_NAME}, but {exc} "
            f"Use a fresh output_dir, or move {target} away."
        ) from exc


def copy_ranking(ranking_file: Path, output_dir: str | Path) -> Path:
    """The ranking's exact bytes (so its sha256 is the recorded one) as
    ``OUTPUT_DIR/ila_ranking.json``, atomically; a no-op when it is that file."""
    target = Path(output_dir) / RANKING_COPY_NAME
    if target.exists() and target.samefile(ranking_file):
        return target
    data = Path(ranking_file).read_bytes()
    if target.exists() and target.read_bytes() == data:
        return target
    check_writable(target, load_ranking(ranking_file).fingerprint)
    write_bytes_atomic(target, data)
    return target
