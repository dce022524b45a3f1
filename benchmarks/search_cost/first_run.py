"""What the first run costs: ILA's search inside the training run, against the same
run with the ranking already present.

    python -m benchmarks.search_cost.first_run --model MODEL_DIR --data DATA_DIR [--steps 300] [--micro-batch-size 2] [--runs manpages:1 ...]

For every DATASET:SEED in ``--runs`` (each one resumable: a finished part is kept
in WORKDIR/results.json and skipped on a rerun), on SmolLM2 with LoRA, drop 25%:

1. ``first``: ``axolotl train`` with no ranking present and every ``ila_`` key at
   its default: the run searches, writes the ranking, and continues from the
   warm-up to ``--steps`` (one run).
2. ``cached``: the same config and seed with that ranking present: fresh adapters
   on the same kept modules for all ``--steps`` steps. This is the second run of
   the paper's two-run protocol, with the selection held equal, so the two eval
   losses differ only by continuing (with the dropped modules' warm-up discarded)
   versus starting afresh.
3. ``paper``: ``axolotl-ila search`` at the paper's length (the warm-up run to a
   quarter of ``--steps``, 128 gate steps, no re-learning check), for the Jaccard of its top-75% set
   with the first run's ranking.

Both training runs are timed as whole ``axolotl train`` processes, after one
untimed ``axolotl preprocess`` so that neither pays for tokenization. Eval loss is
on the dataset's held-out ``eval.jsonl`` at the last step. Prints one row per run
and a summary; the targets are a wall-time ratio <= 1.10 and a Jaccard >= 0.90.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

from axolotl_ila.atomic import write_json_atomic
from benchmarks.common import config, last_metric, run, search, train


def log_time(log: Path, marker: str) -> datetime.datetime:
    """When the first line of an axolotl debug.log holding ``marker`` was written."""
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if marker in line and line.startswith("[20"):
            return datetime.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
    raise SystemExit(f"{log}: no line with {marker!r}")


def phases(work: Path, name: str, steps: int, warmup_steps: int) -> dict[str, float]:
    """Where the first run's time went, from the two runs' debug.log: the switch
    (gates stopped to the training's first step), and the seconds per training
    step after it, next to the cached run's over all its steps."""
    first, cached = work / "runs" / f"{name}-first" / "debug.log", work / "runs" / f"{name}-cached" / "debug.log"
    start, done = "Starting trainer", "Training completed"
    span = lambda log, a, b: (log_time(log, b) - log_time(log, a)).total_seconds()  # noqa: E731
    return {
        "switch_s": span(first, "ILA gates stopped", start),
        "first_s_per_step": span(first, start, done) / (steps - warmup_steps),
        "cached_s_per_step": span(cached, start, done) / steps,
    }


def cpu_seconds() -> float:
    """User + system CPU time of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_train(path: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and final eval loss of one ``axolotl train``.
    With one thread (``OMP_NUM_THREADS=1``) the CPU seconds are what the run
    would take alone on the machine, even when other jobs share it."""
    started, cpu = time.perf_counter(), cpu_seconds()
    log = train(path)
    return time.perf_counter() - started, cpu_seconds() - cpu, last_metric(log, "eval_loss")


def part(results: dict, key: str, work: Path, compute) -> dict:
    """One resumable piece of the study: computed once, then read back."""
    if key not in results:
        results[key] = compute()
        write_json_atomic(work / "results.json", results)
        print(f"  {key}: {results[key]}", flush=True)
    return results[key]


def study(model: Path, dataset: Path, seed: int, steps: int, batch: int, warmup_fraction: float | None, work: Path, results: dict) -> dict:
    from axolotl_ila.ranking.analysis import jaccard, top_set
    from axolotl_ila.ranking.file import load_ranking

    name = f"{dataset.name}-s{seed}"
    ranking = work / "rankings" / f"{name}.json"
    common = dict(
        eval_rows=True, seed=seed, max_steps=steps, micro_batch_size=batch, eval_strategy="steps", eval_steps=steps,
        plugins=["axolotl_ila.ILAPlugin"], ila_ranking=str(ranking), ila_drop_fraction=0.25,
        **({} if warmup_fraction is None else {"ila_warmup_fraction": warmup_fraction}),
    )
    first_cfg = config(model, dataset, work, f"{name}-first", **common)
    if any(f"{name}|{part_name}" not in results for part_name in ("first", "cached", "paper")):
        run([sys.executable, "-m", "axolotl.cli.preprocess", str(first_cfg)], f"preprocess {name}")

    def first() -> dict:
        if ranking.exists():  # a run killed after its search: start it again from nothing
            ranking.unlink()
        seconds, cpu, loss = timed_train(first_cfg)
        search_record = load_ranking(ranking).search
        return {
            "wall_s": round(seconds, 1),
            "cpu_s": round(cpu, 1),
            "eval_loss": loss,
            "warmup_steps": search_record["stage1"]["steps"],
            "warmup_stop": search_record["stage1"]["stop_reason"],
            "gate_steps": search_record["stage2"]["steps"],
            "gate_stop": search_record["stage2"]["stop_reason"],
            "relearn_steps": search_record["relearn"]["steps"],
            "relearn_s": search_record["relearn"].get("wall_s", 0.0),
            "search_s": round(sum(search_record[k].get("wall_s", 0.0) for k in ("stage1", "relearn", "stage2")), 1),
        }

    def cached() -> dict:
        seconds, cpu, loss = timed_train(config(model, dataset, work, f"{name}-cached", ila_search="never", **common))
        return {"wall_s": round(seconds, 1), "cpu_s": round(cpu, 1), "eval_loss": loss}

    def paper() -> dict:
        # The reference does not depend on the first run's settings: one already
        # in the workdir (written whole, or copied from another workdir of the
        # same --steps and --micro-batch-size) is used as it is.
        paper_ranking = work / "rankings" / f"{name}-paper.json"
        cap = math.ceil(0.25 * steps)
        if not paper_ranking.exists():
            search(config(
                model, dataset, work, f"{name}-paper", seed=seed, max_steps=steps, micro_batch_size=batch, plugins=["axolotl_ila.ILAPlugin"],
                ila_ranking=str(paper_ranking), ila_search="always", ila_warmup_fraction=0.25, ila_warmup_min_steps=cap, ila_gate_steps=128,
                ila_gate_min_steps=128, ila_relearn_steps=0,
            ))
        ours, theirs = top_set(load_ranking(ranking)), top_set(load_ranking(paper_ranking))
        return {"jaccard_top75": round(jaccard(ours, theirs), 4)}

    return {
        "first": part(results, f"{name}|first", work, first),
        "cached": part(results, f"{name}|cached", work, cached),
        "paper": part(results, f"{name}|paper", work, paper),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/first-run"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--micro-batch-size", type=int, default=2, help="2 keeps a SmolLM2 step near one second on 2 cores")
    parser.add_argument(
        "--warmup-fraction", type=float, default=None,
        help="ila_warmup_fraction of the first run; default: not set, the plugin's default",
    )
    parser.add_argument("--runs", nargs="+", default=["manpages:1", "manpages:2", "manpages:3", "python-reference:1", "stdlib-docs:1"])
    args = parser.parse_args(argv)
    work = args.workdir.resolve()
    results_path = work / "results.json"
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.exists() else {}
    threads = os.environ.get("OMP_NUM_THREADS", "all")
    # The fraction the first run uses, the plugin's default resolved: a workdir
    # made before a default changed is not mistaken for one made after.
    from axolotl_ila.args import ILAArgs
    from axolotl_ila.runtime.engines import DEFAULT_RELEARN_STEPS

    fraction = args.warmup_fraction if args.warmup_fraction is not None else ILAArgs.model_fields["ila_warmup_fraction"].default
    settings = {"steps": args.steps, "micro_batch_size": args.micro_batch_size, "warmup_fraction": fraction, "threads": threads,
                "relearn_steps": DEFAULT_RELEARN_STEPS}
    held = results.setdefault("settings", settings)
    held.setdefault("relearn_steps", 0)  # a workdir from before the re-learning check
    if held != settings:
        raise SystemExit(
            f"{results_path} holds runs made with {held}, not {settings}: "
            "give another --workdir, or the same --steps, --micro-batch-size, --warmup-fraction and OMP_NUM_THREADS"
        )

    rows = []
    for item in args.runs:
        dataset_name, _, seed = item.partition(":")
        dataset = args.data / dataset_name
        if not (dataset / "train.jsonl").exists():
            raise SystemExit(f"--runs {item}: no {dataset / 'train.jsonl'}; build the datasets with bash benchmarks/common/setup.sh")
        rows.append((item, study(args.model.resolve(), dataset.resolve(), int(seed), args.steps, args.micro_batch_size, args.warmup_fraction, work, results)))

    if args.warmup_fraction is None:
        search_keys = f"every ila_ key at its default (ila_warmup_fraction {fraction:g}, ila_relearn_steps {held['relearn_steps']})"
    else:
        search_keys = f"ila_warmup_fraction {args.warmup_fraction:g}, every other ila_ key at its default"
    print(f"\nmodel {args.model}, {args.steps} planned steps, micro-batch {args.micro_batch_size} x 128 tokens, LoRA r=8, drop 25%, {search_keys}")
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("torch", "transformers", "peft", "axolotl"))
    print(f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs), Python {platform.python_version()}, {versions}, {time.strftime('%Y-%m-%d')}")
    print(
        "| dataset:seed | warm-up steps (stop) | re-learning steps (s) | gate steps (stop) | gates s | switch s | s/step after the switch (cached run) "
        "| first run s (CPU s) | cached run s (CPU s) | first / cached, wall (CPU) | top-75% Jaccard vs paper-length "
        "| eval loss one run | eval loss two runs | one - two |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ratios, cpu_ratios, jaccards, diffs = [], [], [], []
    for item, r in rows:
        first, cached, paper = r["first"], r["cached"], r["paper"]
        ratio = first["wall_s"] / cached["wall_s"]
        cpu_ratio = first["cpu_s"] / cached["cpu_s"] if "cpu_s" in first and "cpu_s" in cached else None
        diff = first["eval_loss"] - cached["eval_loss"]
        ratios.append(ratio)
        if cpu_ratio is not None:
            cpu_ratios.append(cpu_ratio)
        cpu = lambda part: f" ({part['cpu_s']:.0f})" if "cpu_s" in part else ""  # noqa: E731
        jaccards.append(paper["jaccard_top75"])
        diffs.append(diff)
        name = item.replace(":", "-s")
        ranking = json.loads((work / "rankings" / f"{name}.json").read_text(encoding="utf-8"))
        where = phases(work, name, args.steps, first["warmup_steps"])
        print(
            f"| {item} | {first['warmup_steps']} ({first['warmup_stop']}) | {first.get('relearn_steps', 0)} ({first.get('relearn_s', 0):.0f}) "
            f"| {first['gate_steps']} ({first['gate_stop']}) "
            f"| {ranking['search']['stage2']['wall_s']:.0f} | {where['switch_s']:.0f} "
            f"| {where['first_s_per_step']:.2f} ({where['cached_s_per_step']:.2f}) "
            f"| {first['wall_s']:.0f}{cpu(first)} | {cached['wall_s']:.0f}{cpu(cached)} "
            f"| {ratio:.3f}{f' ({cpu_ratio:.3f})' if cpu_ratio is not None else ''} | {paper['jaccard_top75']:.3f} "
            f"| {first['eval_loss']:.4f} | {cached['eval_loss']:.4f} | {diff:+.4f} |"
        )
    if len(rows) > 1:
        spread = lambda v: f"{statistics.mean(v):.3f} (min {min(v):.3f}, max {max(v):.3f})"  # noqa: E731
        print(f"\nfirst / cached wall time: {spread(ratios)}; target <= 1.10")
        if len(cpu_ratios) == len(rows):
            print(f"first / cached CPU time: {spread(cpu_ratios)}")
        print(f"top-75% Jaccard vs paper-length search: {spread(jaccards)}; target >= 0.90")
        print(f"eval loss, one run - two runs: {statistics.mean(diffs):+.4f} (min {min(diffs):+.4f}, max {max(diffs):+.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
