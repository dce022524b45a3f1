"""Held-out loss after equal training: all-module LoRA, ILA, and the baselines.

    python -m benchmarks.quality.run --model MODEL_DIR --data DATA_DIR --rankings RANKINGS_DIR [--seeds 1 2 3]

For every dataset in DATA_DIR and every seed, trains SmolLM2 with the same steps,
learning rate and data order for each variant, and evaluates the loss on the
dataset's held-out ``eval.jsonl`` at the end:

    all           LoRA on every linear module (no plugin)
    ila drop .25  ILA ranking, least important 25% dropped (the paper's best quality)
    ila keep .3   ILA ranking, top 30% kept (the paper's efficiency mode)
    ila drop .25 groups   (only with --variants) as "ila drop .25", each block's
                  q/k/v and gate/up/down kept or dropped whole (``ila_fused_groups: true``)
    random / first / last / mid_block / update_norm   drop 25%, the same budget as "ila drop .25"

The ranking of each dataset is RANKINGS_DIR/<dataset>-seed<first seed>.json (made
by ``benchmarks.stability.run``), so ILA and update_norm use the same warm-up. Prints mean and
standard deviation over seeds, and the difference to all-module LoRA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.common import VARIANTS, config, last_metric, train

EXTRA_VARIANTS = {
    "ila drop .25 groups": {"ila_strategy": "ila", "ila_drop_fraction": 0.25, "ila_fused_groups": True},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--rankings", required=True, type=Path)
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/quality"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--datasets", nargs="*", help="dataset folder names (default: all in --data)")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS) + list(EXTRA_VARIANTS), help="variants to run besides all (default: every one but the extra 'ila drop .25 groups')")
    args = parser.parse_args(argv)
    known = {**VARIANTS, **EXTRA_VARIANTS}
    variants = {v: known[v] for v in known if v == "all" or (v in args.variants if args.variants else v in VARIANTS)}

    work = args.workdir.resolve()
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    datasets = sorted(p for p in args.data.iterdir() if (p / "eval.jsonl").exists() and (not args.datasets or p.name in args.datasets))
    for dataset in datasets:
        ranking = args.rankings / f"{dataset.name}-seed{args.seeds[0]}.json"
        if not ranking.exists():
            raise SystemExit(f"no ranking {ranking}; run python -m benchmarks.stability.run first (or search one with axolotl-ila search)")
        for seed in args.seeds:
            for variant, keys in variants.items():
                key = f"{dataset.name}|{seed}|{variant}"
                if key in results:
                    continue
                plugin = {"plugins": ["axolotl_ila.ILAPlugin"], "ila_ranking": str(ranking), "ila_search": "never", "ila_seed": seed} if keys else {}
                name = f"{dataset.name}-s{seed}-{variant.replace(' ', '-').replace('.', '')}"
                path = config(
                    args.model, dataset, work, name, eval_rows=True, seed=seed, max_steps=args.steps,
                    eval_strategy="steps", eval_steps=args.steps, **plugin, **keys,
                )
                started = time.perf_counter()
                results[key] = last_metric(train(path), "eval_loss")
                print(f"  {key}: eval loss {results[key]:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
                work.mkdir(parents=True, exist_ok=True)
                results_path.write_text(json.dumps(results, indent=1))

    print(f"\nmodel {args.model}, {args.steps} steps per run, seeds {args.seeds}, eval loss on each dataset's eval.jsonl (lower is better)")
    print("| dataset | variant | eval loss mean | std | vs all |")
    print("|---|---|---|---|---|")
    for dataset in datasets:
        losses = {v: [results[f"{dataset.name}|{s}|{v}"] for s in args.seeds] for v in variants}
        base = statistics.mean(losses["all"])
        for variant, values in losses.items():
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"| {dataset.name} | {variant} | {statistics.mean(values):.4f} | {std:.4f} | {statistics.mean(values) - base:+.4f} |")
    if "ila drop .25 groups" in variants:
        print_group_overlap(datasets, args.rankings, args.seeds[0])
    return 0


def print_group_overlap(datasets: list[Path], rankings: Path, seed: int) -> None:
    """How much keeping fused groups whole changes ILA's selection."""
    from axolotl_ila.ranking.analysis import jaccard
    from axolotl_ila.ranking.file import load_ranking
    from axolotl_ila.selection import FUSED_GROUPS, importance_order, select

    print("\n| dataset | rule | kept (single modules) | kept (whole groups) | Jaccard of the kept sets |")
    print("|---|---|---|---|---|")
    for dataset in datasets:
        ranking = load_ranking(rankings / f"{dataset.name}-seed{seed}.json")
        order = importance_order(ranking.names, "ila", ranking=ranking)
        for label, rule in (("drop .25", {"drop_fraction": 0.25}), ("keep .3", {"keep_fraction": 0.3})):
            single = set(select(ranking.names, order, "ila", **rule).kept)
            whole = set(select(ranking.names, order, "ila", groups=tuple(FUSED_GROUPS), **rule).kept)
            print(f"| {dataset.name} | {label} | {len(single)} | {len(whole)} | {jaccard(single, whole):.3f} |")


if __name__ == "__main__":
    raise SystemExit(main())
