"""The re-learning check: which modules' work other modules' LoRA can take over.

The gates (stage 2) rank the warm-up's LoRA updates as they are, with LoRA
frozen. An update can be valuable now only because it stands in for another
module's update that the warm-up had not finished: on a task whose largest
change sits in one module, the other modules of its block pick up part of that
change during the warm-up, and the frozen gates rank them high. Trained on its
own, the unfinished module takes that part back, and those modules buy little.

The check runs the gates once more for a fixed number of steps, with the LoRA
matrices learning beside them (``gates.run_gates`` with a LoRA learning rate),
from the warm-up's state, which is restored afterwards. A module these gates
push out of the open share (the top ``ila_gate_budget`` of the modules) does
work that the others can learn to do: it is ranked after every module they
keep, in the frozen gates' order among themselves. The check only demotes: the
order of the modules it keeps is the frozen gates' order (the re-learning gates
alone favour modules that can absorb any change, such as ``lm_head``, over the
ones that carry it; docs/planted.md has the numbers).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from axolotl_ila.search.lora_update import lora_parameters


def open_share(relearn_scores: dict[str, float], budget: float) -> set[str]:
    """The modules the re-learning gates keep open: the top ``budget`` share of
    them by score (at least one), ties broken by the given order."""
    names = list(relearn_scores)
    count = max(1, math.floor(budget * len(names) + 1e-9))
    ranked = sorted(range(len(names)), key=lambda i: (-relearn_scores[names[i]], i))
    return {names[i] for i in ranked[:count]}


def demote(gate_scores: dict[str, float], kept: set[str]) -> tuple[dict[str, float], float]:
    """Scores in which every module outside ``kept`` ranks after every module in
    it, each group in its gate order: a demoted module's score is its gate
    score minus one common shift. Returns the scores and the shift (0.0 when
    nothing needs to move)."""
    inside = [s for n, s in gate_scores.items() if n in kept]
    outside = [s for n, s in gate_scores.items() if n not in kept]
    if not inside or not outside or max(outside) < min(inside):
        return dict(gate_scores), 0.0
    shift = max(outside) - min(inside) + 1.0
    return {n: (s if n in kept else s - shift) for n, s in gate_scores.items()}, shift


@contextmanager
def lora_restored(layers: dict[str, Any]) -> Iterator[None]:
    """The LoRA weights as they are now, put back on leaving (FSDP2's sharded
    parameters shard by shard: no collective)."""
    params = lora_parameters(layers)
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(params, saved):
                param.copy_(value)
