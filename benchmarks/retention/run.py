"""What a fine-tune learns and what it keeps: ILA against LoRA on every module.

    python -m benchmarks.retention.data --out data/retention --items 200
    python -m benchmarks.retention.run --model MODEL_DIR --data DATA_DIR --dataset manpages [stdlib-docs ...] \\
        [--retention-data data/retention] [--seeds 1 2 3] [--epochs 2] [--train-rows 256] \\
        [--loss-rows N] [--variants all "ila drop .25" ...] [--results benchmarks/retention/results/smollm2]

The paper's question (Shi et al., Tables 1, 5, 8, 9): does dropping the least
important modules keep more of what the base model knew, while learning the new
data as well? For each dataset named by ``--dataset`` (folders of DATA_DIR), and
every seed, it trains SmolLM2 for ``--epochs`` epochs over the first
``--train-rows`` rows of its train.jsonl with each variant (same learning rate,
schedule and data order), then scores the result with ``benchmarks.retention.score``:

- learning: held-out loss on the dataset's own eval.jsonl (in domain);
- forgetting: held-out loss on every other dataset's eval.jsonl (out of domain),
  and lm-eval accuracy on the benchmark subsets (HellaSwag, ARC, PIQA, MMLU),
  next to the base model's.

Variants (``--variants``, default: the first five):

    all                LoRA on every linear module (no plugin)
    ila drop .25       ILA, the 25% least important modules dropped (the paper's best)
    ila keep .3        ILA, the top 30% kept (the paper's efficiency mode)
    attention only     LoRA on q/k/v/o only (the paper's Table 1 baseline)
    mlp only           LoRA on gate/up/down only (Table 1)
    no q,k             LoRA on everything but q_proj/k_proj (what the rankings mostly drop)
    random, first, last, mid_block, update_norm   drop 25%, as many modules as ILA
    ila drop .25 intersect / mean-rank   ILA drop 25% with a ranking combined from
                       every dataset in DATA_DIR (``axolotl-ila combine``; Table 9)

Rankings are DATA's own ``RANKINGS/<dataset>-seed<first seed>.json`` (as
``benchmarks.stability.run`` makes them; searched here with the same settings if missing).
Resumable: every finished run writes RESULTS/<run>.json (its scores, with every
benchmark item's 0/1 result) and a rerun skips it; a trained adapter whose
scoring was interrupted is scored without retraining. ``--report`` prints the
tables from RESULTS without running anything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.common import VARIANTS as DROP_VARIANTS
from benchmarks.common import combine, config, search_ranking, train
from benchmarks.retention.score import TASKS, alpaca_rows, evaluate
from benchmarks.retention.stats import report, summary

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# name -> (axolotl keys, ranking: None = no plugin, "own" = the dataset's, or a combine method)
VARIANTS: dict[str, tuple[dict[str, Any], str | None]] = {
    "all": ({}, None),
    "ila drop .25": (DROP_VARIANTS["ila drop .25"], "own"),
    "ila keep .3": (DROP_VARIANTS["ila keep .3"], "own"),
    "attention only": ({"lora_target_linear": False, "lora_target_modules": ATTENTION}, None),
    "mlp only": ({"lora_target_linear": False, "lora_target_modules": MLP}, None),
    "no q,k": ({"lora_target_linear": False, "lora_target_modules": ATTENTION[2:] + MLP}, None),
    **{name: (DROP_VARIANTS[name], "own") for name in ("random", "first", "last", "mid_block", "update_norm")},
    "ila drop .25 intersect": (DROP_VARIANTS["ila drop .25"], "intersect"),
    "ila drop .25 mean-rank": (DROP_VARIANTS["ila drop .25"], "mean-rank"),
}
DEFAULT_VARIANTS = ["all", "ila drop .25", "ila keep .3", "attention only", "mlp only"]


def slug(text: str) -> str:
    return text.replace(" ", "-").replace(".", "").replace(",", "")


def training_data(dataset: Path, rows: int, work: Path) -> Path:
    """The first ``rows`` training rows and the full eval set, as a dataset folder."""
    train_rows = alpaca_rows(dataset / "train.jsonl")
    if rows > len(train_rows):
        raise SystemExit(f"--train-rows {rows} but {dataset / 'train.jsonl'} has {len(train_rows)} rows")
    folder = work / "data" / f"{dataset.name}-{rows}"
    if not (folder / "eval.jsonl").exists():
        from axolotl_ila.atomic import write_jsonl

        write_jsonl(folder / "train.jsonl", train_rows[:rows])
        shutil.copyfile(dataset / "eval.jsonl", folder / ".eval.jsonl.tmp")
        (folder / ".eval.jsonl.tmp").replace(folder / "eval.jsonl")
    return folder


def rankings_for(args, datasets: list[Path], trained_on: str, needed: set[str], work: Path) -> dict[str, Path]:
    """Paths of the rankings the chosen variants need, searched or combined if missing."""
    if not needed:
        return {}
    seed = args.seeds[0]
    own = {d.name: args.rankings / f"{d.name}-seed{seed}.json" for d in datasets}
    # a combined ranking needs every dataset's own
    wanted = datasets if needed - {"own"} else [d for d in datasets if d.name == trained_on]
    for dataset in wanted:
        if not own[dataset.name].exists():
            started = time.perf_counter()
            search_ranking(args.model, dataset, work, own[dataset.name], seed, warmup_steps=args.warmup_steps, gate_steps=args.gate_steps)
            print(f"  searched {own[dataset.name].name} in {time.perf_counter() - started:.0f} s", flush=True)
    paths = {"own": own[trained_on]}
    for method in needed - {"own"}:
        paths[method] = args.rankings / f"combined-{method}-seed{seed}.json"
        if not paths[method].exists():
            combine([own[d.name] for d in datasets], paths[method], method)
    return paths


def check_scored_alike(path: Path, args) -> None:
    """A result kept from an earlier run is reused only if it was scored on the
    same benchmark tasks and the same number of loss rows (a study mixing them
    would compare unlike numbers)."""
    kept = json.loads(path.read_text(encoding="utf-8"))
    missing = sorted(set(args.tasks) - set(kept.get("benchmarks", {})))
    if missing or kept.get("loss_rows") != args.loss_rows:
        raise SystemExit(
            f"{path} was scored with tasks {sorted(kept.get('benchmarks', {}))} and --loss-rows {kept.get('loss_rows')}, "
            f"not tasks {sorted(args.tasks)} and --loss-rows {args.loss_rows}: give another --results folder for this study"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path, help="folder of datasets from benchmarks.common.build_datasets")
    parser.add_argument("--dataset", "--datasets", dest="datasets", nargs="+", required=True, help="the folders of DATA to train on, one study each")
    parser.add_argument("--retention-data", type=Path, default=Path("data/retention"))
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--rankings", type=Path, help="folder of <dataset>-seed<N>.json rankings (default: WORKDIR/rankings)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/retention"))
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results" / "smollm2")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-rows", type=int, default=256)
    parser.add_argument("--loss-rows", type=int, help="score the losses on the first N rows of each eval.jsonl (default: all)")
    parser.add_argument("--warmup-steps", type=int, default=60, help="warm-up of a ranking searched here")
    parser.add_argument("--gate-steps", type=int, default=32, help="gate steps of a ranking searched here")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument("--report", action="store_true", help="only print the tables from RESULTS")
    args = parser.parse_args(argv)
    if "all" not in args.variants:
        args.variants.insert(0, "all")  # every difference is taken against it

    if args.report:
        print(tables(args))
        return 0
    work = args.workdir.resolve()
    args.rankings = (args.rankings or work / "rankings").resolve()
    datasets = sorted(p for p in args.data.iterdir() if (p / "eval.jsonl").exists())
    for name in args.datasets:
        if name not in {d.name for d in datasets}:
            raise SystemExit(f"--dataset {name!r} is not a dataset folder of {args.data} ({', '.join(d.name for d in datasets)})")
    for task in args.tasks:  # fail before hours of training, not after
        if not (args.retention_data / f"{task.removeprefix('ila_')}.jsonl").exists():
            raise SystemExit(f"no {args.retention_data / task.removeprefix('ila_')}.jsonl; run python -m benchmarks.retention.data --out {args.retention_data}")

    def score(name: str, adapter: Path | None, meta: dict[str, Any]) -> None:
        out = args.results / f"{name}.json"
        if out.exists():
            check_scored_alike(out, args)
            return
        started = time.perf_counter()
        scores = evaluate(args.model, adapter, args.tasks, args.retention_data, datasets, loss_rows=args.loss_rows)
        from axolotl_ila.atomic import write_json_atomic

        write_json_atomic(out, {**meta, "loss_rows": args.loss_rows, "retention_data": str(args.retention_data.resolve()), "eval_seconds": round(time.perf_counter() - started), **scores})
        print(f"  {name}: loss {json.dumps({k: round(v, 4) for k, v in scores['loss'].items()})} ({time.perf_counter() - started:.0f} s to score)", flush=True)

    score("base", None, {"variant": "base"})  # first: a scoring problem shows before hours of training
    for dataset in args.datasets:
        data = training_data(args.data / dataset, args.train_rows, work)
        rankings = rankings_for(args, datasets, dataset, {VARIANTS[v][1] for v in args.variants} - {None}, work)
        for seed in args.seeds:
            for variant in args.variants:
                name = f"{dataset}-e{args.epochs}-r{args.train_rows}-s{seed}-{slug(variant)}"
                if (args.results / f"{name}.json").exists():
                    check_scored_alike(args.results / f"{name}.json", args)
                    continue
                keys, ranking = VARIANTS[variant]
                plugin = {"plugins": ["axolotl_ila.ILAPlugin"], "ila_ranking": str(rankings[ranking]), "ila_search": "never", "ila_seed": seed} if ranking else {}
                path = config(args.model, data, work, name, seed=seed, num_epochs=args.epochs, **plugin, **keys)
                run_dir = work / "runs" / name
                started = time.perf_counter()
                if not (run_dir / "adapter_model.safetensors").exists():
                    train(path)
                meta = {"variant": variant, "dataset": dataset, "seed": seed, "epochs": args.epochs, "train_rows": args.train_rows,
                        "train_seconds": round(time.perf_counter() - started), "ranking": str(rankings[ranking]) if ranking else None}
                score(name, run_dir, meta)
    print(tables(args))
    return 0


def tables(args) -> str:
    """Each dataset's tables, then (for several) the differences side by side."""
    parts = [report(args.results, dataset, args.variants, args.seeds) for dataset in args.datasets]
    if len(args.datasets) > 1:
        parts.append(summary(args.results, args.datasets, args.variants, args.seeds))
    return "\n\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
