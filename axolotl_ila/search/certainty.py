"""How sure a ranking is: did each stage of its search settle, and how much was
its order still moving when it stopped?

Each stage records why it stopped (``settled`` or ``cap``) and its last check:
the rank correlation and top-75% Jaccard of its order against the order at
about half its steps. A stage is *settled* when that last check agreed at
``agreement`` or more on both measures, whatever stopped it (a stage that ran
to its cap with a steady order is as settled as one that stopped early).

Only the gates warn. The warm-up's figures are kept as information: on the
planted-task suite its "not settled" marked 41 of the 44 default searches, all
of whose rankings were within 0.01 of the planted set, and flagged the searches
that did rank badly no more often than the others
(``python -m benchmarks.planted.run --certainty``), so a warning on it would
fire on nearly every run and tell nothing.
"""

from __future__ import annotations

from typing import Any

_NAMES = {"stage1": "warm-up", "stage2": "gates"}


def stage_certainty(stage: dict[str, Any], default_agreement: float = 0.9) -> dict[str, Any]:
    """One stage's summary: stop reason, last comparison, and whether it settled."""
    settle = stage.get("settle") or {}
    agreement = float(settle.get("agreement", default_agreement))
    last = settle.get("last_check") or {}
    rho, jaccard = last.get("spearman"), last.get("top75_jaccard")
    checked = rho is not None and jaccard is not None
    return {
        "stop_reason": stage.get("stop_reason"),
        "steps": stage.get("steps"),
        "max_steps": stage.get("max_steps"),
        "agreement": agreement,
        "last_spearman": rho,
        "last_top75_jaccard": jaccard,
        "compared_steps": [last.get("compared_with_step"), last.get("step")] if checked else None,
        "settled": bool(checked and rho >= agreement and jaccard >= agreement),
    }


def certainty(search: dict[str, Any]) -> dict[str, Any]:
    """The certainty section of a ranking file's ``search``, from its stages."""
    stages = {key: stage_certainty(search[key]) for key in ("stage1", "stage2") if isinstance(search.get(key), dict)}
    return {
        "settled": bool(stages) and all(s["settled"] for s in stages.values()),
        "warmup": stages.get("stage1"),
        "gates": stages.get("stage2"),
    }


def comparison(info: dict[str, Any]) -> str:
    """A stage's last check (``stage_certainty``), in words."""
    if info["compared_steps"] is None:
        return "too short to compare its order with an earlier one"
    earlier, last = info["compared_steps"]
    return (
        f"order at step {last} against step {earlier}: rank correlation {info['last_spearman']:.2f}, "
        f"top-75% Jaccard {info['last_top75_jaccard']:.2f}"
    )


def certainty_warnings(search: dict[str, Any]) -> list[str]:
    """Plain sentences for the log and ``show``: one if the gates had not
    settled (the only stage that warns, see the module's docstring), saying how
    much their order was moving and what to change. Empty for a ranking
    without search stages (e.g. a combined one)."""
    stage = search.get("stage2")
    if not isinstance(stage, dict):
        return []
    info = stage_certainty(stage)
    if info["settled"]:
        return []
    moving = comparison(info)
    if info["compared_steps"] is not None:
        moving = f"its {moving} (settled needs {info['agreement']:g})"
    why = "ran to its cap" if info["stop_reason"] == "cap" else f"stopped ({info['stop_reason']})"
    return [
        f"this ranking's gates had not settled: it {why} after {info['steps']}/{info['max_steps']} steps "
        f"with the order still moving ({moving}). Modules whose update was still growing may be ranked too low; "
        f"to search longer, raise ila_gate_steps, and search again (ila_search: always)."
    ]


def certainty_figures(search: dict[str, Any]) -> list[str]:
    """One line per stage: why it stopped and how its last order compared with
    the order at half its steps (what ``axolotl-ila show`` prints)."""
    lines = []
    for key in ("stage1", "stage2"):
        stage = search.get(key)
        if not isinstance(stage, dict):
            continue
        info = stage_certainty(stage)
        moving = comparison(info)
        verdict = "settled" if info["settled"] else "still moving"
        lines.append(f"{_NAMES[key]}: {info['steps']}/{info['max_steps']} steps ({info['stop_reason']}), {moving}: {verdict}")
    return lines
