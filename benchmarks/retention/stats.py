"""Tables of the retention study, with paired 95% intervals against all-module LoRA.

Benchmarks: for each item, the difference of its 0/1 score between a variant and
all-module LoRA, averaged over the seeds both have; the interval is the normal
approximation over items (mean +- 1.96 sd / sqrt(items)), so it covers item
sampling and the seed-to-seed noise each item shows, not how different a new
set of seeds could make the models as a whole. Losses: the per-seed difference
to all-module LoRA, t-interval over seeds (three seeds make it wide).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any


def load_runs(results: Path, dataset: str) -> tuple[dict[str, Any], dict[str, dict[int, dict[str, Any]]]]:
    """The base model's scores, and {variant: {seed: scores}} for runs on ``dataset``."""
    base_path = results / "base.json"
    if not base_path.exists():
        raise SystemExit(f"no {base_path}: the study has not scored the base model yet")
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(results.glob("*.json")):
        run = json.loads(path.read_text(encoding="utf-8"))
        if run.get("dataset") == dataset:
            runs.setdefault(run["variant"], {})[run["seed"]] = run
    return json.loads(base_path.read_text(encoding="utf-8")), runs


def chosen_runs(results: Path, dataset: str, variants: list[str], seeds: list[int]) -> tuple[dict[str, Any], dict[str, dict[int, dict[str, Any]]]]:
    """``load_runs``, kept to the given variants (each possibly empty) and seeds."""
    base, runs = load_runs(results, dataset)
    return base, {v: {s: r for s, r in runs.get(v, {}).items() if s in seeds} for v in variants}


def loss_differences(by_seed: dict[int, dict[str, Any]], against: dict[int, dict[str, Any]], dataset: str, others: list[str]) -> tuple[tuple[float, float], tuple[float, float]]:
    """In-domain and mean out-of-domain loss, ``by_seed`` minus ``against`` per
    shared seed: each a mean and the half-width of its t-interval over seeds."""
    shared = sorted(set(by_seed) & set(against))
    ood = lambda run: statistics.mean(run["loss"][d] for d in others)  # noqa: E731
    return (
        t_interval([by_seed[s]["loss"][dataset] - against[s]["loss"][dataset] for s in shared]),
        t_interval([ood(by_seed[s]) - ood(against[s]) for s in shared]),
    )


def paired_items(variant: dict[int, dict[str, Any]], reference: dict[int, dict[str, Any]], task: str, metric: int) -> dict[str, float]:
    """Per item: the variant's score minus the reference's, averaged over shared seeds."""
    seeds = sorted(set(variant) & set(reference))
    items = reference[seeds[0]]["benchmarks"][task]["items"]
    return {i: statistics.mean(variant[s]["benchmarks"][task]["items"][i][metric] - reference[s]["benchmarks"][task]["items"][i][metric] for s in seeds) for i in items}


def items_vs_base(runs: dict[int, dict[str, Any]], base: dict[str, Any], task: str, metric: int) -> dict[str, float]:
    """Per item: the trained model's score (mean over seeds) minus the base model's."""
    items = base["benchmarks"][task]["items"]
    return {i: statistics.mean(r["benchmarks"][task]["items"][i][metric] for r in runs.values()) - items[i][metric] for i in items}


def item_differences(variant: str, by_seed: dict[int, dict[str, Any]], reference: dict[int, dict[str, Any]], base: dict[str, Any], task: str, metric: int) -> dict[str, float]:
    """All-module LoRA against the base model (what it forgot); any other variant against all-module LoRA."""
    return items_vs_base(by_seed, base, task, metric) if variant == "all" else paired_items(by_seed, reference, task, metric)


def normal_interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% normal-approximation interval."""
    mean = statistics.mean(values)
    return mean, 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def t_interval(values: list[float]) -> tuple[float, float]:
    from scipy.stats import t

    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def fmt(mean: float, half: float, digits: int = 3) -> str:
    return f"{mean:+.{digits}f}" + ("" if math.isnan(half) else f" [{mean - half:+.{digits}f}, {mean + half:+.{digits}f}]")


def versus(variant: str, diffs: list[float]) -> str:
    interval = fmt(*normal_interval(diffs))
    return f"(vs base {interval})" if variant == "all" else interval


def mean_over_seeds(runs: dict[int, dict[str, Any]], pick) -> float:
    return statistics.mean(pick(r) for r in runs.values())


def report(results: Path, dataset: str, variants: list[str], seeds: list[int]) -> str:
    base, runs = chosen_runs(results, dataset, variants, seeds)
    if not runs.get("all"):
        return f"no finished all-module LoRA run on {dataset} in {results} yet"
    reference = runs["all"]
    runs = {v: r for v, r in runs.items() if set(r) & set(reference)}  # only what can be paired
    others = [d for d in sorted(base["loss"]) if d != dataset]
    tasks = list(base["benchmarks"])
    lines = [f"trained on {dataset}; seeds per variant: " + ", ".join(f"{v} {len(r)}" for v, r in runs.items()), ""]

    lines += ["| variant | " + " | ".join([f"{dataset} loss (in domain)", "vs all"] + [f"{d} loss" for d in others] + ["out-of-domain mean", "vs all"]) + " |"]
    lines += ["|---" * (5 + len(others)) + "|"]
    lines += [f"| base | {base['loss'][dataset]:.4f} | | " + " | ".join(f"{base['loss'][d]:.4f}" for d in others) + f" | {statistics.mean(base['loss'][d] for d in others):.4f} | |"]
    for variant, by_seed in runs.items():
        in_diff, ood_diff = loss_differences(by_seed, reference, dataset, others)
        ood = [statistics.mean(r["loss"][d] for d in others) for r in by_seed.values()]
        cells = [f"{mean_over_seeds(by_seed, lambda r: r['loss'][dataset]):.4f}", fmt(*in_diff, 4) if variant != "all" else ""]
        cells += [f"{mean_over_seeds(by_seed, lambda r, d=d: r['loss'][d]):.4f}" for d in others]
        cells += [f"{statistics.mean(ood):.4f}", fmt(*ood_diff, 4) if variant != "all" else ""]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")

    for metric, label in ((1, "acc_norm"), (0, "acc")):
        lines += ["", f"{label} (base model in the first row; each cell: mean over seeds, then the paired difference to all-module LoRA, or for all-module LoRA to the base model [95% interval over items])", ""]
        lines += ["| variant | " + " | ".join(t.removeprefix("ila_") for t in tasks) + " | pooled |", "|---" * (len(tasks) + 2) + "|"]
        lines.append("| base | " + " | ".join(f"{base['benchmarks'][t][label]:.3f}" for t in tasks) + f" | {statistics.mean(v[metric] for t in tasks for v in base['benchmarks'][t]['items'].values()):.3f} |")
        for variant, by_seed in runs.items():
            cells = []
            pooled_diffs: list[float] = []
            for task in tasks:
                value = mean_over_seeds(by_seed, lambda r: r["benchmarks"][task][label])
                diffs = list(item_differences(variant, by_seed, reference, base, task, metric).values())
                pooled_diffs += diffs
                cells.append(f"{value:.3f} {versus(variant, diffs)}")
            pooled = statistics.mean(v[metric] for r in by_seed.values() for t in tasks for v in r["benchmarks"][t]["items"].values())
            cells.append(f"{pooled:.3f} {versus(variant, pooled_diffs)}")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(results: Path, datasets: list[str], variants: list[str], seeds: list[int]) -> str:
    """Every dataset's differences in one table: in-domain and out-of-domain loss
    (t-interval over seeds) and acc_norm pooled over the benchmarks (normal
    interval over items); all-module LoRA against the base model, every other
    variant against all-module LoRA. The last rows pool the datasets: each
    item's difference is averaged over them first, so an item counts once
    however many datasets were trained on."""
    studies = {}
    for dataset in datasets:
        base, runs = chosen_runs(results, dataset, variants, seeds)
        if runs.get("all"):
            studies[dataset] = runs
    if not studies:
        return f"no finished all-module LoRA run in {results} yet"
    tasks = list(base["benchmarks"])
    lines = [
        "Differences to all-module LoRA (for `all` itself: to the base model), mean [95% interval]; "
        "losses over seeds, acc_norm over items, pooled over " + ", ".join(t.removeprefix("ila_") for t in tasks),
        "",
        "| trained on | variant | seeds | in-domain loss | out-of-domain loss | acc_norm |",
        "|---|---|---|---|---|---|",
    ]
    per_item: dict[str, dict[tuple[str, str], list[float]]] = {}
    for dataset, runs in studies.items():
        others = [d for d in sorted(base["loss"]) if d != dataset]
        reference = runs["all"]
        for variant in variants:
            by_seed = runs.get(variant, {})
            shared = sorted(set(by_seed) & set(reference))
            if not shared:
                continue
            against = {s: {"loss": base["loss"]} for s in shared} if variant == "all" else reference
            in_domain, out_of_domain = (fmt(*interval, 4) for interval in loss_differences(by_seed, against, dataset, others))
            diffs = {(t, i): d for t in tasks for i, d in item_differences(variant, by_seed, reference, base, t, 1).items()}
            for key, d in diffs.items():
                per_item.setdefault(variant, {}).setdefault(key, []).append(d)
            lines.append(f"| {dataset} | {variant} | {len(shared)} | {in_domain} | {out_of_domain} | {fmt(*normal_interval(list(diffs.values())))} |")
    if len(studies) > 1:
        for variant, items in per_item.items():
            lines.append(f"| all {len(studies)} datasets | {variant} | | | | {fmt(*normal_interval([statistics.mean(d) for d in items.values()]))} |")
    return "\n".join(lines)
