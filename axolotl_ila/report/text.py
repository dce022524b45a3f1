"""A ranking as lines of text, for the search's log and ``axolotl-ila show``:
its most and least important modules, and what its search's re-learning check
did to the order."""

from __future__ import annotations

from typing import Any

from axolotl_ila.ranking.file import Ranking
from axolotl_ila.selection import Selection


def top_bottom_table(ranking: Ranking, n: int = 5, selection: Selection | None = None) -> list[str]:
    """The ``n`` most and ``n`` least important modules, one line each; with a
    selection, also their LoRA update norms (where recorded) and keep/DROP."""
    has_norm = all(m.update_norm is not None for m in ranking.modules)

    def row(rank: str, score: str, norm: str, mark: str, name: str) -> str:
        cells = [rank, score] + ([norm, mark] if selection is not None else []) + [name]
        return "  " + "  ".join(cells)

    kept = set(selection.kept) if selection is not None else set()
    lines = [row(f"{'rank':>4}", f"{'score':>9}", f"{'upd norm' if has_norm else '':>9}", f"{'':4}", "module")]
    count = len(ranking.modules)
    shown = sorted(set(range(min(n, count))) | set(range(max(count - n, 0), count)))
    previous = -1
    for i in shown:
        if i != previous + 1:
            lines.append("  ...")
        m = ranking.modules[i]
        norm = f"{m.update_norm:>9.4f}" if has_norm else " " * 9
        lines.append(row(f"{i + 1:>4}", f"{m.score:>9.4f}", norm, f"{'keep' if m.name in kept else 'DROP':4}", m.name))
        previous = i
    return lines


def relearn_line(relearn: dict[str, Any]) -> str:
    """What the re-learning check did to the order, in one line."""
    if not relearn.get("steps"):
        return f"no re-learning check ({relearn.get('why_not', 'off')}): the gates alone give the order"
    closed = relearn.get("closed") or []
    moved = "" if relearn.get("shift") else "; none ranked above a kept one, so the order is the gates' own"
    return (
        f"{relearn['steps']} steps with LoRA learning; {len(closed)} modules closed (their work, others' LoRA "
        f"can learn) are ranked after the rest{moved}"
    )
