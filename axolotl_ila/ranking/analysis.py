"""Comparing and combining rankings: the paper's Tables 2-4 and 9, as an API.

Pure Python over ``Ranking`` objects (no axolotl import), for the CLI, tests and
notebooks:

    from axolotl_ila.ranking.analysis import combine, compare, jaccard, top_set
    from axolotl_ila.ranking.file import load_ranking
    a, b = load_ranking("a.json"), load_ranking("b.json")
    jaccard(top_set(a), top_set(b))        # top-75% agreement
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from axolotl_ila.ranking.file import Ranking, RankingError

COMBINE_METHODS = ("intersect", "mean-rank")


def fraction_count(fraction: float, total: int) -> int:
    """How many of ``total`` a fraction is: rounded half up, unlike round()."""
    return int(fraction * total + 0.5)


def top_names(order: Sequence[Any], p: float) -> list[Any]:
    """The ``round(p * n)`` first of an order, most important first."""
    return list(order[: fraction_count(p, len(order))])


def top_set(ranking: Ranking, p: float = 0.75) -> set[str]:
    """The ``round(p * n)`` most important modules."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"--top must be in (0, 1], got {p}")
    return set(top_names(ranking.names, p))


def bottom_set(ranking: Ranking, k_fraction: float) -> set[str]:
    """The ``round(k_fraction * n)`` least important modules."""
    k = fraction_count(k_fraction, len(ranking.modules))
    return set(ranking.names[len(ranking.names) - k :]) if k else set()


def jaccard(a: set[Any], b: set[Any]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def top_jaccard(a: Sequence[float], b: Sequence[float], fraction: float = 0.75) -> float:
    """Jaccard similarity of the top-``fraction`` sets of two score vectors
    (entry i of both scores the same unit; ties broken by position)."""

    def top(scores: Sequence[float]) -> set[int]:
        return set(top_names(sorted(range(len(scores)), key=lambda i: (-scores[i], i)), fraction))

    return jaccard(top(a), top(b))


def check_same_architecture(rankings: Sequence[Ranking], labels: Sequence[str]) -> None:
    """Rankings can only be compared or combined over the same modules."""
    first, first_label = rankings[0], labels[0]
    for ranking, label in zip(rankings[1:], labels[1:]):
        if ranking.fingerprint != first.fingerprint:
            raise RankingError(
                f"{label} ({ranking.model.get('base_model')}) and {first_label} "
                f"({first.model.get('base_model')}) rank different architectures; compare rankings of one model."
            )
        if set(ranking.names) != set(first.names):
            only = sorted(set(ranking.names) ^ set(first.names))
            raise RankingError(
                f"{label} and {first_label} rank different module sets (e.g. {', '.join(only[:3])}); "
                f"they were searched with different LoRA targets."
            )


@dataclass
class Comparison:
    labels: list[str]
    p: float
    matrix: list[list[float]]
    in_all: list[str]  # modules in every top set
    in_some: list[str]  # in at least one top set, not in all

    def to_json(self) -> dict[str, Any]:
        pairs = [
            {"a": self.labels[i], "b": self.labels[j], "jaccard": self.matrix[i][j]}
            for i in range(len(self.labels))
            for j in range(i + 1, len(self.labels))
        ]
        return {
            "top": self.p,
            "labels": self.labels,
            "jaccard": self.matrix,
            "pairs": pairs,
            "in_all_top_sets": self.in_all,
            "in_some_top_sets": self.in_some,
        }


def compare(rankings: Sequence[Ranking], labels: Sequence[str], p: float = 0.75) -> Comparison:
    if len(rankings) < 2:
        raise ValueError("compare needs at least two rankings")
    check_same_architecture(rankings, labels)
    tops = [top_set(r, p) for r in rankings]
    matrix = [[round(jaccard(a, b), 6) for b in tops] for a in tops]
    order = rankings[0].names
    in_all = set.intersection(*tops)
    in_any = set.union(*tops)
    return Comparison(
        labels=list(labels),
        p=p,
        matrix=matrix,
        in_all=[n for n in order if n in in_all],
        in_some=[n for n in order if n in in_any - in_all],
    )


def mean_ranks(rankings: Sequence[Ranking]) -> dict[str, float]:
    """Each module's rank (0 = most important) averaged over the rankings."""
    totals: dict[str, float] = {name: 0.0 for name in rankings[0].names}
    for ranking in rankings:
        for rank, name in enumerate(ranking.names):
            totals[name] += rank
    return {name: total / len(rankings) for name, total in totals.items()}


def combine(
    rankings: Sequence[Ranking],
    labels: Sequence[str],
    method: str = "intersect",
    k_fraction: float = 0.25,
    digests: Sequence[str | None] | None = None,
) -> Ranking:
    """One ranking from several of the same model.

    ``mean-rank``: modules ordered by their mean rank; score = -mean rank.

    ``intersect`` (the paper's Table 9): a module is least important only if every
    input ranks it among its K = round(k_fraction * n) least important. Those
    modules (the intersection, possibly empty) go last; all others come first,
    each group ordered by mean rank. Scores are -mean rank, minus n for the
    intersection so the order is strictly the grouped one. To drop exactly the
    intersection, set ``ila_drop_fraction`` to ``len(least_important) / n``, which
    the output records as ``search.combine.drop_fraction_for_intersection``.
    """
    if len(rankings) < 2:
        raise ValueError("combine needs at least two rankings")
    if method not in COMBINE_METHODS:
        raise ValueError(f"--method must be one of {', '.join(COMBINE_METHODS)}, got {method!r}")
    if not 0.0 < k_fraction < 1.0:
        raise ValueError(f"--k-fraction must be in (0, 1), got {k_fraction}")
    check_same_architecture(rankings, labels)
    means = mean_ranks(rankings)
    n = len(means)
    scores = {name: -mean for name, mean in means.items()}
    details: dict[str, Any] = {"method": method}
    if method == "intersect":
        least = set.intersection(*(bottom_set(r, k_fraction) for r in rankings))
        for name in least:
            scores[name] -= n
        ordered_least = sorted(least, key=lambda name: means[name])
        details.update(
            k_fraction=k_fraction,
            k=fraction_count(k_fraction, n),
            least_important=ordered_least,
            drop_fraction_for_intersection=round(len(least) / n, 6),
        )
    digests = digests or [None] * len(rankings)
    details["inputs"] = [
        {
            "path": label,
            "digest": digest,
            "data": ranking.search.get("data"),
            "seed": ranking.search.get("seed"),
            "scorer": ranking.scorer,
        }
        for ranking, label, digest in zip(rankings, labels, digests)
    ]
    return Ranking.from_scores(
        scores,
        model=dict(rankings[0].model),
        search={"method": "combine", "combine": details},
        scorer=f"combined-{method}",
        module_order=rankings[0].names,
    )
