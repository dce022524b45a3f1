"""The ranking heatmap (the paper's Fig. 1): block index by module type.

Colour is the score; the modules dropped at the given fraction carry an ``x``.
Modules outside the blocks (``lm_head``) get a column ("head") and a row (their
name) of their own, at the right and at the bottom, so no block's module type
seems to own them. The image is ``max(8, 2.5 + 0.32 * columns)`` by
``1.6 + 0.42 * rows`` inches at 100 dpi, so its pixel size depends only on the
model's shape.
"""

from __future__ import annotations

import os
from pathlib import Path

from axolotl_ila.architecture import block_index, module_kind
from axolotl_ila.atomic import write_atomic
from axolotl_ila.ranking.file import Ranking
from axolotl_ila.selection import importance_order, select

DPI = 100


def figure_size(ranking: Ranking) -> tuple[float, float]:
    """Inches (width, height) of the heatmap for this ranking's module layout."""
    rows, columns, _ = layout(ranking.names)
    return max(8.0, 2.5 + 0.32 * len(columns)), 1.6 + 0.42 * max(len(rows), 1)


def _short_data(ranking: Ranking) -> str:
    datasets = (ranking.search.get("data") or {}).get("datasets") or []
    # The folder and file name tell datasets apart ("manpages/train.jsonl").
    names = ["/".join(Path(str(d.get("path", "?"))).parts[-2:]) for d in datasets if isinstance(d, dict)]
    if ranking.search.get("method") == "combine":
        inputs = ranking.search.get("combine", {}).get("inputs", [])
        return f"combined from {len(inputs)} rankings"
    return ", ".join(names) or "unknown data"


def _short_model(ranking: Ranking) -> str:
    """A hub id as is; a local folder by its name."""
    base = str(ranking.model.get("base_model") or "?")
    return Path(base).name if base.startswith(("/", ".")) else base


def layout(names: list[str]) -> tuple[list[str], list[str], dict[str, tuple[int, int]]]:
    """Row labels, column labels, and each module's (row, column) cell.

    Rows are module types, columns blocks; a module outside the blocks
    (``lm_head``) has the "head" column and a row named after it.
    """
    block_ids = sorted({b for b in map(block_index, names) if b is not None})
    # The ranking does not keep model order, so types are listed alphabetically
    # (mlp.* above self_attn.*), the same for every ranking of a model.
    kinds = sorted({module_kind(n) for n in names if block_index(n) is not None})
    outside = [n for n in names if block_index(n) is None]
    columns = [str(b) for b in block_ids] + (["head"] if outside else [])
    rows = kinds + outside
    cells = {}
    for name in names:
        block = block_index(name)
        if block is None:
            cells[name] = (rows.index(name), len(columns) - 1)
        else:
            cells[name] = (rows.index(module_kind(name)), block_ids.index(block))
    return rows, columns, cells


def heatmap(
    ranking: Ranking,
    out_png: str | os.PathLike,
    drop_fraction: float | None = None,
    keep_fraction: float | None = None,
    scorer: str = "score",
    groups: tuple[str, ...] = (),
) -> Path:
    """Draw the heatmap to ``out_png`` (written atomically) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = ranking.names
    order = importance_order(names, "ila" if scorer == "score" else scorer, ranking=ranking)
    selection = select(names, order, "ila", drop_fraction=drop_fraction, keep_fraction=keep_fraction, groups=groups)
    dropped = set(selection.dropped)
    values = {m.name: (m.score if scorer == "score" else m.update_norm) for m in ranking.modules}

    rows, columns, cells = layout(names)
    grid = np.full((len(rows), len(columns)), np.nan)
    marks = []
    for name, (row, col) in cells.items():
        grid[row, col] = values[name]
        if name in dropped:
            marks.append((col, row))

    width, height = figure_size(ranking)
    fig, ax = plt.subplots(figsize=(width, height), dpi=DPI)
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
    for col, row in marks:
        ax.text(col, row, "x", ha="center", va="center", color="white", fontsize=9, fontweight="bold")
    ax.set_xticks(range(len(columns)), columns, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    outside = [n for n in names if block_index(n) is None]
    ax.set_xlabel("transformer block" + (f" (head: {', '.join(outside)}, outside the blocks)" if outside else ""))
    fraction = f"{selection.mode} {selection.fraction:g}" + (f", whole {'/'.join(selection.groups)}" if selection.groups else "")
    ax.set_title(
        f"{_short_model(ranking)}: {ranking.scorer if scorer == 'score' else scorer} "
        f"({_short_data(ranking)}); x = dropped at {fraction} ({len(dropped)}/{len(names)})",
        fontsize=9,
    )
    bar = fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    bar.set_label("gate score" if scorer == "score" and ranking.scorer == "ila_gate" else scorer, fontsize=8)
    fig.tight_layout()

    try:
        return write_atomic(out_png, lambda temp: fig.savefig(temp, dpi=DPI, format="png"))
    finally:
        plt.close(fig)
