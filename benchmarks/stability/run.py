"""Do rankings hold still? Seeds, datasets and warm-up length, on a real model.

    python -m benchmarks.stability.run --model MODEL_DIR --data DATA_DIR [--workdir DIR]

MODEL_DIR is the SmolLM2 folder from ``benchmarks.common.prepare_smollm2``; DATA_DIR holds the
datasets from ``benchmarks.common.build_datasets`` (one folder each, with train/eval.jsonl).
Runs ``axolotl-ila search`` for

- three seeds on the first dataset,
- every dataset with the first seed,
- warm-up milestones (1, 25, 50, 75, 100% of the full warm-up) on the first
  dataset and seed (the warm-up is forced to run to its cap),

then reports each group with ``axolotl-ila compare`` (Jaccard of the top-75%
sets, the paper's Tables 2-4) and draws every ranking's heatmap. Rankings land
in WORKDIR/rankings, heatmaps next to them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import compare, search_ranking

MILESTONES = (1, 25, 50, 75, 100)


def print_matrix(title: str, result: dict) -> None:
    labels = result["labels"]
    matrix = result["jaccard"]
    print(f"\n{title} (Jaccard of top-75% sets, axolotl-ila compare)")
    print("| | " + " | ".join(labels) + " |")
    print("|---" * (len(labels) + 1) + "|")
    for label, row in zip(labels, matrix):
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in row) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/stability"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--warmup-steps", type=int, default=60, help="the full (100%%) warm-up, in optimizer steps")
    parser.add_argument("--gate-steps", type=int, default=32)
    args = parser.parse_args(argv)

    work = args.workdir.resolve()
    datasets = sorted(p for p in args.data.iterdir() if (p / "train.jsonl").exists())
    if len(datasets) < 2:
        raise SystemExit(f"need at least two datasets in {args.data}; run bash benchmarks/common/setup.sh")
    rankings = work / "rankings"
    rankings.mkdir(parents=True, exist_ok=True)
    def ranking(name: str, dataset: Path, seed: int, warmup: int) -> Path:
        path = rankings / f"{name}.json"
        if not path.exists():
            started = time.perf_counter()
            search_ranking(args.model, dataset, work, path, seed, warmup_steps=warmup, gate_steps=args.gate_steps, planned_steps=args.warmup_steps * 4)
            print(f"  searched {name} in {time.perf_counter() - started:.0f} s", flush=True)
        return path

    first, seed0 = datasets[0], args.seeds[0]
    by_seed = [ranking(f"{first.name}-seed{s}", first, s, args.warmup_steps) for s in args.seeds]
    by_data = [by_seed[0]] + [ranking(f"{d.name}-seed{seed0}", d, seed0, args.warmup_steps) for d in datasets[1:]]
    by_length = [
        ranking(f"{first.name}-seed{seed0}-warmup{m}pct", first, seed0, max(1, round(args.warmup_steps * m / 100)))
        if m != 100
        else by_seed[0]
        for m in MILESTONES
    ]

    print(f"\nmodel {args.model}, warm-up {args.warmup_steps} steps, {args.gate_steps} gate steps, CPU settings in benchmarks/common")
    print_matrix(f"across seeds ({first.name})", compare(by_seed))
    print_matrix(f"across datasets (seed {seed0})", compare(by_data))
    print_matrix(f"across warm-up milestones {', '.join(f'{m}%' for m in MILESTONES)} ({first.name}, seed {seed0})", compare(by_length))
    print(f"\nrankings and heatmaps: {rankings}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
