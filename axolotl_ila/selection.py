"""Which modules get adapters (or stay trainable): every strategy, one rule.

Each strategy produces an *importance order* over the candidate modules (the
modules the user's own LoRA targets would adapt). Then one rule applies to all of
them: ``ila_drop_fraction`` drops the tail of that order, ``ila_keep_fraction``
keeps its head.

    ila          the ranking's gate scores (the paper's method)
    update_norm  the ranking's LoRA update norms from the warm-up (ALLO-style)
    random       a seeded random order
    first        the first (shallowest) modules count as least important, as in
                 the paper's "first K" ablation: drop removes them
    last         the last (deepest) modules count as least important
    mid_block    distance of a module's block from the middle of the depth;
                 ``ila_keep_fraction: 0.6`` tunes the blocks from 20% to 80% of depth

With fused groups (``ila_fused_groups``), the projections that one of axolotl's
fused LoRA kernels handles together (q/k/v, gate/up/down of one block) are kept
or dropped as a unit, ranked by the mean position of its members, so the kernel
still applies to every block that keeps them.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from axolotl_ila.architecture import block_index, depth_order, module_kind, num_blocks
from axolotl_ila.ranking.analysis import fraction_count
from axolotl_ila.ranking.file import Ranking, RankingError

RANKED_STRATEGIES = {"ila": "score", "update_norm": "update_norm"}
UNRANKED_STRATEGIES = ("random", "first", "last", "mid_block")
STRATEGIES = tuple(RANKED_STRATEGIES) + UNRANKED_STRATEGIES

DEFAULT_DROP_FRACTION = 0.25

# axolotl's fused LoRA kernels patch a block's q/k/v (``lora_qkv_kernel``) or
# gate/up/down (``lora_mlp_kernel``) only when every one of them carries LoRA.
FUSED_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


class SelectionError(ValueError):
    """A selection that cannot be made, with the key to change."""


@dataclass(frozen=True)
class Selection:
    """The outcome: which candidate modules keep adapters, which do not."""

    kept: tuple[str, ...]  # model order
    dropped: tuple[str, ...]  # model order
    strategy: str
    mode: str  # "drop" or "keep"
    fraction: float
    groups: tuple[str, ...] = ()  # fused groups kept or dropped whole (keys of FUSED_GROUPS)

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "mode": self.mode,
            "fraction": self.fraction,
            "groups": list(self.groups),
            "kept": list(self.kept),
            "dropped": list(self.dropped),
        }

    def summary(self) -> str:
        """One compact block of text: totals, per module type, per block."""
        total = len(self.kept) + len(self.dropped)
        kept_kinds = Counter(map(module_kind, self.kept))
        all_kinds = Counter(map(module_kind, self.kept + self.dropped))
        kinds = ", ".join(f"{kind} {kept_kinds[kind]}/{n}" for kind, n in sorted(all_kinds.items()))
        kept_blocks = Counter(b for b in map(block_index, self.kept) if b is not None)
        all_blocks = Counter(b for b in map(block_index, self.kept + self.dropped) if b is not None)
        blocks = " ".join(f"{b}:{kept_blocks[b]}/{all_blocks[b]}" for b in sorted(all_blocks))
        whole = f"; whole groups: {', '.join(self.groups)}" if self.groups else ""
        return (
            f"ILA selection ({self.strategy}, {self.mode} {self.fraction:g}{whole}): "
            f"kept {len(self.kept)}/{total} modules, dropped {len(self.dropped)}\n"
            f"  per type (kept/all): {kinds}\n"
            f"  per block (kept/all): {blocks}"
        )


def importance_order(
    candidates: list[str],
    strategy: str,
    ranking: Ranking | None = None,
    seed: int = 42,
) -> list[str]:
    """The candidates, most important first, under ``strategy``."""
    if strategy in RANKED_STRATEGIES:
        if ranking is None:
            raise SelectionError(f"ila_strategy: {strategy} needs a ranking (set `ila_ranking`).")
        ranked = ranking.order(RANKED_STRATEGIES[strategy])
        scored = set(ranked)
        missing = [name for name in candidates if name not in scored]
        if missing:
            raise RankingError(
                f"the ranking does not score {len(missing)} of the {len(candidates)} modules "
                f"your LoRA targets would adapt (e.g. {', '.join(missing[:3])}). Search again "
                f"with these targets (`ila_search: always`), or narrow `lora_target_modules`."
            )
        wanted = set(candidates)
        return [name for name in ranked if name in wanted]
    if strategy == "random":
        order = list(candidates)
        random.Random(seed).shuffle(order)
        return order
    if strategy == "first":
        return list(reversed(depth_order(candidates)))
    if strategy == "last":
        return depth_order(candidates)
    if strategy == "mid_block":
        depth = max(num_blocks(candidates), 1)
        middle = (depth - 1) / 2
        shallow_to_deep = depth_order(candidates)
        position = {name: i for i, name in enumerate(shallow_to_deep)}

        def distance(name: str) -> tuple[float, int]:
            block = block_index(name)
            return (abs((depth if block is None else block) - middle), position[name])

        return sorted(candidates, key=distance)
    raise SelectionError(f"ila_strategy: unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")


def _fused_member(name: str, groups: tuple[str, ...]) -> tuple[str, str] | None:
    """(parent module, group) when ``name`` is a member of one of ``groups``."""
    parent, _, leaf = name.rpartition(".")
    for group in groups:
        if leaf in FUSED_GROUPS[group]:
            return parent, group
    return None


def present_groups(names: list[str], groups: tuple[str, ...]) -> tuple[str, ...]:
    """The fused groups these modules have: those of which some parent module
    holds at least two members as separate modules. Phi-3 has neither: its
    ``qkv_proj`` and ``gate_up_proj`` are fused into one module already, and a
    lone ``down_proj`` is no group."""
    for group in groups:
        if group not in FUSED_GROUPS:
            raise SelectionError(f"unknown fused group {group!r}; known: {', '.join(FUSED_GROUPS)}.")
    present = []
    for group in groups:
        per_parent = Counter(member[0] for member in map(lambda n: _fused_member(n, (group,)), names) if member)
        if any(count >= 2 for count in per_parent.values()):
            present.append(group)
    return tuple(present)


def no_groups_note(groups: tuple[str, ...]) -> str:
    """Why asking for fused groups changes nothing for this model."""
    members = " or ".join("/".join(FUSED_GROUPS[g]) for g in groups)
    return (
        f"no block has {members} as separate modules (a model like Phi-3 fuses them into qkv_proj "
        f"and gate_up_proj already), so fused groups group nothing: each module is kept or dropped alone"
    )


def units(order: list[str], groups: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The importance order in units that are kept or dropped whole, most
    important first: one per fused group present (its members under one parent
    module, placed by their mean position), one per other module."""
    for group in groups:
        if group not in FUSED_GROUPS:
            raise SelectionError(f"unknown fused group {group!r}; known: {', '.join(FUSED_GROUPS)}.")
    members: dict[tuple[str, str], list[str]] = {}
    for name in order:
        members.setdefault(_fused_member(name, groups) or (name, ""), []).append(name)
    position = {name: i for i, name in enumerate(order)}

    def importance(unit: list[str]) -> tuple[float, int]:
        return (sum(position[name] for name in unit) / len(unit), position[unit[0]])

    return [tuple(unit) for unit in sorted(members.values(), key=importance)]


def split_groups(selection: Selection, group: str) -> list[str]:
    """Parent modules (e.g. ``model.layers.3.self_attn``) where the selection
    keeps some but not all members of the fused ``group``."""
    kept = set(selection.kept)
    members: dict[str, list[bool]] = {}
    for name in selection.kept + selection.dropped:
        member = _fused_member(name, (group,))
        if member:
            members.setdefault(member[0], []).append(name in kept)
    return [parent for parent, flags in members.items() if any(flags) and not all(flags)]


def _fill(ordered_units: list[tuple[str, ...]], target: int) -> set[str]:
    """Take units in order while the count stays within ``target``; a unit too
    large for what is left is passed over for smaller ones after it."""
    taken: set[str] = set()
    for unit in ordered_units:
        if len(taken) + len(unit) <= target:
            taken.update(unit)
    return taken


def select(
    candidates: list[str],
    order: list[str],
    strategy: str,
    drop_fraction: float | None = None,
    keep_fraction: float | None = None,
    groups: tuple[str, ...] = (),
) -> Selection:
    """Apply the drop/keep rule to an importance order. With ``groups``, the
    members of each fused group are kept or dropped together, and the count
    kept (``keep``) or dropped (``drop``) is the largest that whole units allow
    without exceeding the fraction's."""
    if drop_fraction is not None and keep_fraction is not None:
        raise SelectionError("set either ila_drop_fraction or ila_keep_fraction, not both.")
    if sorted(order) != sorted(candidates):
        raise SelectionError("internal: the importance order does not cover the candidates exactly.")
    total = len(candidates)
    if total == 0:
        raise SelectionError(
            "no module is targeted by LoRA, so there is nothing to select; check "
            "`lora_target_modules` / `lora_target_linear`."
        )
    if keep_fraction is not None:
        mode, fraction, n_keep = "keep", keep_fraction, fraction_count(keep_fraction, total)
        key = "ila_keep_fraction"
    else:
        fraction = DEFAULT_DROP_FRACTION if drop_fraction is None else drop_fraction
        mode, n_keep = "drop", total - fraction_count(fraction, total)
        key = "ila_drop_fraction"
    if n_keep <= 0:
        raise SelectionError(
            f"{key}: {fraction:g} of {total} modules would leave no module to train; "
            f"{'raise' if mode == 'keep' else 'lower'} it."
        )
    if n_keep >= total:
        raise SelectionError(
            f"{key}: {fraction:g} of {total} modules drops no module; "
            f"{'lower' if mode == 'keep' else 'raise'} it (one module is {1 / total:.3g} of {total})."
        )
    groups = present_groups(candidates, tuple(groups))
    ordered_units = units(order, groups)
    if mode == "keep":
        keep = _fill(ordered_units, n_keep)
    else:
        keep = set(candidates) - _fill(ordered_units[::-1], total - n_keep)
    if groups and not 0 < len(keep) < total:
        raise SelectionError(
            f"{key}: {fraction:g} of {total} modules {mode}s no module once the fused groups "
            f"({', '.join(groups)}) are kept or dropped whole; raise {key}, or set ila_fused_groups: false."
        )
    return Selection(
        kept=tuple(n for n in candidates if n in keep),
        dropped=tuple(n for n in candidates if n not in keep),
        strategy=strategy,
        mode=mode,
        fraction=fraction,
        groups=tuple(groups),
    )
