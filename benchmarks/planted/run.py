"""What a ranking buys, over many planted tasks.

    python -m benchmarks.planted.run [--tasks 20] [--strategies ila update_norm ...] [--work DIR]

Task i is ``benchmarks.planted.tasks.random_task(i)``: a random family (Llama, Qwen2,
Mistral, GPT-NeoX), depth, planted modules, delta rank and size, and planned
run length (150-1000 steps). For each task the truth is measured once (the KL
of reverting each planted delta, and the held-out loss of LoRA on the planted
set at the planned steps). For each strategy, a search runs the way
``axolotl-ila search`` runs it (``search_config_file`` on an axolotl config of
the task), and LoRA on the strategy's top k (k = the number of planted
modules) is trained for the planned steps; its keep-k regret is its held-out
loss minus the planted set's.

Tasks 902, 904, 952 and 954 are not drawn: they are the two examples of the
issue that asked for this suite (a Llama of 4 blocks and a Qwen2 of 6, initial
weights 0.25, rank-4 deltas in named modules), each at 200 and 400 planned
steps (``ISSUE_TASKS``; the issue does not give the deltas' size: 1.0 of the
weight). ``--seeds`` runs a list of tasks instead of a range.

Resumable: the record (``record.py``: ``truth.jsonl``, ``sets.jsonl``,
``searches.jsonl``, ``results.jsonl`` under ``results/``) gains one line per
finished piece, and a rerun skips what it holds. A strategy's results are
found by the settings it runs with, not by its name. Built models and data go
under ``--work`` (scratch, rebuilt on demand).

    python -m benchmarks.planted.run --docs-tables   # every table of docs/planted.md
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.planted.tasks import (
    PlantedTask,
    base_gradient_scores,
    build_task,
    candidate_modules,
    load_json,
    measure_truth,
    random_task,
    recall,
    search_config,
    train_lora,
    write_config,
)
from benchmarks.planted.record import Record, commit, now, result_key, search_key, search_settings, set_name

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


@dataclass(frozen=True)
class Strategy:
    """A search (the ``ila_`` keys it sets, over the defaults) and which of its
    ranking's scores orders the modules."""

    score: str  # "score" (the ranking's order) or "update_norm"
    overrides: dict[str, Any] = field(default_factory=dict)
    about: str = ""
    gate_step: int | None = None  # order by the gate scores as they were after this many gate steps
    by: str = "search"  # or "base_gradient": no search (``gradient_ranking``)

    def search(self) -> dict[str, Any]:
        """What the ranking is made by, as the record keeps it."""
        if self.by == "base_gradient":
            return {"by": "base_gradient", "batches": GRADIENT_BATCHES}
        return {"by": "search", "settings": search_settings(self.overrides)}

    def order(self) -> dict[str, Any]:
        return {"score": self.score, "gate_step": self.gate_step}

    def key(self) -> str:
        return result_key(self.search(), self.order())


GRADIENT_BATCHES = 4

# The gates alone rank the modules: no re-learning check. Every strategy but
# ``ila`` runs without it (they were measured before the check existed).
GATES_ONLY = {"ila_relearn_steps": 0}

# A search that never settles early: the warm-up runs to its cap and the gates
# for all 128 steps (the paper's fixed-length recipe).
NEVER_SETTLE = {**GATES_ONLY, "ila_settle_agreement": 0.99999}

CAP25 = {"ila_warmup_fraction": 0.25}  # the short end of the paper's 25-50%
# The fixed-length searches of ila_paper25/50: NEVER_SETTLE with the warm-up's
# early stop on and gates from 16 steps on, the settings they ran with (a stage
# that never settles stops at its cap either way).
PAPER = {**NEVER_SETTLE, "ila_warmup_early_stop": True, "ila_gate_min_steps": 16}
W50 = {**GATES_ONLY, "ila_warmup_fraction": 0.5}  # the long end: the default of the searches below that name no length

# Early stops in both stages: the warm-up stops once its probed ranking has
# settled (and the loss has flattened), the gates may stop from 16 steps on.
EARLY16 = {**W50, "ila_warmup_early_stop": True, "ila_gate_min_steps": 16}

# Gates that always run all 128 steps; their scores are kept at every check
# (``gate_snapshots``), so one search gives the ranking after 16, 32, 64 ... steps.
FULL_GATES = {**W50, "ila_gate_min_steps": 128, "ila_gate_steps": 128}
SNAPSHOT_STEPS = (16, 32, 48, 64, 96, 128)


def _issue_tasks() -> dict[int, PlantedTask]:
    llama = ("model.layers.1.mlp.down_proj", "model.layers.2.self_attn.v_proj", "model.layers.3.mlp.up_proj")
    qwen2 = ("model.layers.0.self_attn.o_proj", "model.layers.3.self_attn.k_proj", "model.layers.5.mlp.gate_proj")
    tasks = {}
    for steps in (200, 400):
        seed = 900 + steps // 100
        tasks[seed] = PlantedTask("llama", 4, llama, delta_rank=4, delta_scale=1.0, steps=steps, seed=seed, init_range=0.25)
        tasks[seed + 50] = PlantedTask("qwen2", 6, qwen2, delta_rank=4, delta_scale=1.0, steps=steps, seed=seed + 50, init_range=0.25)
    return tasks


ISSUE_TASKS = _issue_tasks()


def task_for(seed: int) -> PlantedTask:
    return ISSUE_TASKS.get(seed) or random_task(seed)


STRATEGIES: dict[str, Strategy] = {
    "ila": Strategy("score", {}, "every ila_ key at its default (warm-up 0.75 of the run, re-learning check of 32 steps, gates from 64 steps on)"),
    "ila_gates_only": Strategy("score", GATES_ONLY, "ila without the re-learning check (ila_relearn_steps: 0)"),
    "update_norm": Strategy("update_norm", GATES_ONLY, "the default warm-up's update norms (ALLO-style)"),
    "ila_w50": Strategy("score", W50, "ila_gates_only with the warm-up at 0.5 of the run (the paper's long end)"),
    "update_norm_w50": Strategy("update_norm", W50, "the ila_w50 search's warm-up update norms"),
    # The gates compete for as much openness as keep-k keeps.
    "ila_keepk": Strategy("score", {**W50, "ila_gate_budget": "k/n"}, "ila_w50 with ila_gate_budget: k/n"),
    "ila_joint": Strategy("score", {**W50, "ila_gate_budget": "k/n", "ila_gate_train_lora": True}, "ila_keepk, and LoRA keeps learning during the gates"),
    "ila_trainlora75": Strategy("score", {**GATES_ONLY, "ila_gate_train_lora": True}, "ila_gates_only, and LoRA keeps learning during the gates"),
    "ila_w90": Strategy("score", {**GATES_ONLY, "ila_warmup_fraction": 0.9}, "ila_gates_only with the warm-up at 0.9 of the run"),
    "ila_g128_75": Strategy("score", {**GATES_ONLY, "ila_gate_min_steps": 128}, "ila_gates_only with the gates always 128 steps"),
    "ila_trainlora": Strategy("score", {**W50, "ila_gate_train_lora": True}, "ila_w50, and LoRA keeps learning during the gates (budget at its default)"),
    "ila_early16": Strategy("score", EARLY16, "warm-up stops once settled (cap 0.5), gates from 16 steps on"),
    "update_norm_early16": Strategy("update_norm", EARLY16, "update norms of the ila_early16 search"),
    "ila_cap25": Strategy("score", {**EARLY16, **CAP25}, "ila_early16 with the warm-up capped at 0.25"),
    "update_norm_cap25": Strategy("update_norm", {**EARLY16, **CAP25}, "update norms of the ila_cap25 search"),
    # The gates compete for as much openness as keep-k keeps: ila_gate_budget k/n.
    "ila_keepk_cap25": Strategy("score", {**EARLY16, **CAP25, "ila_gate_budget": "k/n"}, "ila_cap25 with ila_gate_budget: k/n"),
    "ila_joint_cap25": Strategy(
        "score",
        {**EARLY16, **CAP25, "ila_gate_budget": "k/n", "ila_gate_train_lora": True},
        "ila_keepk_cap25, and LoRA keeps learning during the gates (ila_gate_train_lora)",
    ),
    "ila_paper25": Strategy("score", {**PAPER, **CAP25}, "warm-up always 25% of the run, 128 gate steps"),
    "ila_paper50": Strategy("score", {**PAPER, "ila_warmup_fraction": 0.5}, "warm-up always 50% of the run, 128 gate steps"),
    "update_norm50": Strategy("update_norm", {**PAPER, "ila_warmup_fraction": 0.5}, "update norms after a warm-up of 50%"),
    "base_grad": Strategy("score", {}, "no search: rank-r energy of the full-weight gradient at the base (4 batches)", by="base_gradient"),
    **{
        f"ila_g{n}": Strategy("score", {**FULL_GATES, "ila_warmup_early_stop": True}, f"ila_early16's warm-up; the gate order after {n} gate steps", n)
        for n in SNAPSHOT_STEPS
    },
    **{
        f"ila_w50_g{n}": Strategy("score", {**NEVER_SETTLE, **FULL_GATES}, f"warm-up always 50% of the run; the gate order after {n} gate steps", n)
        for n in SNAPSHOT_STEPS
    },
}


def order_by(ranking: dict[str, Any], score: str, gate_step: int | None = None) -> list[str]:
    modules = ranking["modules"]
    if gate_step is not None:
        scores = ranking["benchmark_gate_snapshots"][str(gate_step)]
        return sorted(scores, key=lambda name: -scores[name])
    if score == "score":
        return [m["name"] for m in modules]  # the file lists the most important first
    return [m["name"] for m in sorted(modules, key=lambda m: -m[score])]


def run_search(task: PlantedTask, files, strategy: Strategy) -> dict[str, Any]:
    """The ranking file a search with the strategy's settings writes, with its
    wall time and the gate scores at the ``SNAPSHOT_STEPS`` checks."""
    from axolotl_ila.plugin import search_config_file

    work = files.root / f"search-{search_key(strategy.search())}"
    ranking = work / "ranking.json"
    overrides = {k: (task.k / len(candidate_modules(task.family, task.layers)) if v == "k/n" else v) for k, v in strategy.overrides.items()}
    config = write_config(search_config(task, files, work, ranking, **overrides), work / "search.yml")
    started = time.perf_counter()
    with gate_snapshots() as snapshots:
        search_config_file(str(config))
    data = load_json(ranking)
    data["benchmark_wall_s"] = round(time.perf_counter() - started, 2)
    if snapshots:
        data["benchmark_gate_snapshots"] = {str(step): snapshots[step] for step in SNAPSHOT_STEPS if step in snapshots}
    return data


@contextmanager
def gate_snapshots():
    """The gate scores at every settle check of the gate stage (by module
    name), while the search runs in this process."""
    from axolotl_ila.search.gates import observe_gate_checks

    snapshots: dict[int, dict[str, float]] = {}

    def record(label: str, step: int, scores: dict[str, float]) -> None:
        if label == "gates":
            snapshots[step] = scores

    with observe_gate_checks(record):
        yield snapshots


def gradient_ranking(task: PlantedTask, files) -> dict[str, Any]:
    scores = base_gradient_scores(files, task, GRADIENT_BATCHES)
    return {
        "modules": [{"name": n, "score": s} for n, s in sorted(scores.items(), key=lambda kv: -kv[1])],
        "search": {
            "stage1": {"steps": GRADIENT_BATCHES, "max_steps": GRADIENT_BATCHES, "stop_reason": "fixed"},
            "stage2": {"steps": 0, "max_steps": 0, "stop_reason": "none"},
        },
    }


def stamp() -> dict[str, str]:
    return {"commit": commit(), "date": now()}


def set_loss(task: PlantedTask, files, modules: list[str], kept: Record) -> float:
    """Held-out loss of LoRA on ``modules``, kept per task (strategies often agree)."""
    line = kept.get("sets", task.to_dict(), set_name(modules))
    if line is None:
        loss = round(train_lora(files(), task, modules), 5)
        line = kept.add("sets", {**stamp(), "task": task.to_dict(), "modules": sorted(modules), "loss": loss})
    return line["loss"]


def run_task(seed: int, strategies: list[str], work: Path, results: Path) -> None:
    task = task_for(seed)
    kept = Record(results)
    built = None

    def files():
        nonlocal built
        if built is None:
            built = build_task(task, work / task.name)
        return built

    truth = kept.get("truth", task.to_dict())
    if truth is None:
        started = time.perf_counter()
        measured = measure_truth(files(), task)
        truth = kept.add("truth", {**stamp(), "task": task.to_dict(), **measured, "wall_s": round(time.perf_counter() - started, 2)})
        if kept.get("sets", task.to_dict(), set_name(task.planted)) is None:
            kept.add("sets", {**stamp(), "task": task.to_dict(), "modules": sorted(task.planted), "loss": truth["planted_loss"]})
    for name in strategies:
        strategy = STRATEGIES[name]
        key = strategy.key()
        if kept.get("results", task.to_dict(), key) is not None:
            continue
        search = strategy.search()
        found = kept.get("searches", task.to_dict(), search_key(search))
        if found is not None:
            ranking = found["ranking"]
        else:
            ranking = gradient_ranking(task, files()) if strategy.by == "base_gradient" else run_search(task, files(), strategy)
            kept.add("searches", {**stamp(), "task": task.to_dict(), "search_key": search_key(search), "search": search, "ranking": ranking})
        order = order_by(ranking, strategy.score, strategy.gate_step)
        top = order[: task.k]
        loss = set_loss(task, files, top, kept)
        stage1, stage2 = ranking["search"]["stage1"], ranking["search"]["stage2"]
        kept.add(
            "results",
            {
                "strategy": name,
                "key": key,
                **stamp(),
                "task": task.to_dict(),
                "search_key": search_key(search),
                "search": search,
                "order": strategy.order(),
                "top_k": top,
                "loss": loss,
                "planted_loss": truth["planted_loss"],
                "regret": round(loss - truth["planted_loss"], 5),
                "recall": recall(top, task.planted),
                "planted_ranks": {m: order.index(m) + 1 for m in task.planted},
                "search_steps": stage1["steps"] + (strategy.gate_step or stage2["steps"]) + (ranking["search"].get("relearn") or {}).get("steps", 0),
                "warmup": {k: stage1.get(k) for k in ("steps", "max_steps", "stop_reason")},
                "gates": {k: stage2.get(k) for k in ("steps", "max_steps", "stop_reason")},
            },
        )
        print(f"{task.name:28s} {name:14s} regret {loss - truth['planted_loss']:+.4f} recall {recall(top, task.planted):.2f}", flush=True)


def finished(kept: Record, task: PlantedTask, name: str) -> dict[str, Any] | None:
    """The result of strategy ``name`` on ``task``: the line of its settings."""
    return kept.get("results", task.to_dict(), STRATEGIES[name].key())


def table(kept: Record, seeds: list[int], strategies: list[str]) -> str:
    rows = []
    tasks = [task_for(s) for s in seeds]
    header = f"{'strategy':20s} {'tasks':>5s} {'median':>8s} {'worst':>8s} {'mean':>8s} {'recall':>7s} {'steps':>6s}  targets (median <= 0.01, worst <= 0.03)"
    rows.append(header)
    for name in strategies:
        found = [r for r in (finished(kept, t, name) for t in tasks) if r is not None]
        if not found:
            continue
        regrets = [r["regret"] for r in found]
        median, worst = statistics.median(regrets), max(regrets)
        met = ("met" if median <= 0.01 else "MISSED") + " / " + ("met" if worst <= 0.03 else "MISSED")
        rows.append(
            f"{name:20s} {len(found):5d} {median:+8.4f} {worst:+8.4f} {statistics.mean(regrets):+8.4f} "
            f"{statistics.mean(r['recall'] for r in found):7.2f} {statistics.mean(r['search_steps'] for r in found):6.0f}  {met}"
        )
    return "\n".join(rows)


def per_task(kept: Record, seeds: list[int], strategies: list[str]) -> str:
    rows = [f"{'task':28s} {'k':>2s} {'KL all':>7s} {'planted':>8s} " + " ".join(f"{s[:12]:>12s}" for s in strategies)]
    for seed in seeds:
        task = task_for(seed)
        truth = kept.get("truth", task.to_dict())
        if truth is None:
            continue
        cells = []
        for name in strategies:
            result = finished(kept, task, name)
            cells.append(f"{result['regret']:+12.4f}" if result is not None else f"{'-':>12s}")
        rows.append(f"{task.name:28s} {task.k:2d} {truth['kl_revert_all']:7.3f} {truth['planted_loss']:8.4f} " + " ".join(cells))
    return "\n".join(rows)


def certainty_table(kept: Record, seeds: list[int], strategies: list[str]) -> str:
    """How often each stage's "not settled" verdict (``search.certainty``)
    marks the rankings that bought little (keep-k regret above 0.01) and how
    often the others: a verdict worth a warning marks the first, not the second."""
    from axolotl_ila.search.certainty import stage_certainty

    rows = [f"{'strategy':20s} {'regret > 0.01':>14s} {'warm-up flags':>14s} {'gates flag':>11s}   {'others':>7s} {'warm-up flags':>14s} {'gates flag':>11s}"]
    for name in strategies:
        groups: dict[bool, list[tuple[bool, bool]]] = {True: [], False: []}
        for seed in seeds:
            task = task_for(seed)
            result = finished(kept, task, name)
            search = kept.get("searches", task.to_dict(), result["search_key"]) if result is not None else None
            stages = (search or {}).get("ranking", {}).get("search", {})
            if "stage1" not in stages or "stage2" not in stages:
                continue  # not run, or no search stages (base_grad)
            flags = (not stage_certainty(stages["stage1"])["settled"], not stage_certainty(stages["stage2"])["settled"])
            groups[result["regret"] > 0.01].append(flags)
        if not groups[True] and not groups[False]:
            continue
        bad, good = groups[True], groups[False]
        rows.append(
            f"{name:20s} {len(bad):14d} {sum(w for w, _ in bad):14d} {sum(g for _, g in bad):11d}   "
            f"{len(good):7d} {sum(w for w, _ in good):14d} {sum(g for _, g in good):11d}"
        )
    return "\n".join(rows)


def tables(kept: Record, seeds: list[int], strategies: list[str]) -> str:
    """What ``--table-only`` prints: a row per task, then a row per strategy."""
    return per_task(kept, seeds, strategies) + "\n\n" + table(kept, seeds, strategies)


# The tables of docs/planted.md, in its order: each is ``--table-only`` with these arguments.
DOCS_TABLES = (
    "--tasks 20 --strategies ila ila_gates_only update_norm ila_w50 update_norm_w50 ila_early16 update_norm_early16 ila_g64 ila_w50_g16 "
    "ila_w50_g128 ila_cap25 ila_keepk ila_trainlora ila_joint ila_trainlora75",
    "--first 20 --tasks 10 --strategies ila ila_gates_only update_norm ila_w50 ila_trainlora75",
    "--seeds 902 904 952 954 --strategies ila ila_gates_only update_norm ila_w50 ila_trainlora75 ila_w90 ila_g128_75",
    "--first 30 --tasks 10 --strategies ila ila_gates_only update_norm",
)


def quiet() -> None:
    logging.getLogger("axolotl").setLevel(logging.WARNING)


def one_thread() -> None:
    """A worker of ``--jobs``: one thread, as the results were measured (the
    same sums in the same order), and axolotl's log as quiet as the parent's."""
    import torch

    torch.set_num_threads(1)
    quiet()


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20, help="tasks 0..N-1 (random_task(seed))")
    parser.add_argument("--first", type=int, default=0, help="first task seed")
    parser.add_argument("--seeds", type=int, nargs="+", help="these tasks instead of --first/--tasks (902 904 952 954: the issue's examples)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/axolotl-ila-planted"), help="scratch folder for models and data")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the record's folder")
    parser.add_argument("--table-only", action="store_true", help="print the tables of what the record holds, run nothing")
    parser.add_argument("--docs-tables", action="store_true", help="print every table of docs/planted.md from the record, run nothing")
    parser.add_argument("--certainty", action="store_true", help="print how often the certainty verdicts mark the rankings that bought little, run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="tasks run at once, each in a process of its own on one thread (at most the cores)")
    return parser


def seeds_of(args: argparse.Namespace) -> list[int]:
    return args.seeds or list(range(args.first, args.first + args.tasks))


def docs_tables(results: Path = RESULTS) -> list[str]:
    """The tables of docs/planted.md, printed from the record."""
    kept = Record(results)
    out = []
    for line in DOCS_TABLES:
        args = parser().parse_args(line.split())
        out.append(tables(kept, seeds_of(args), args.strategies))
    return out


def main() -> None:
    args = parser().parse_args()
    if args.jobs < 1:
        parser().error(f"--jobs {args.jobs}: give 1 or more")
    if args.docs_tables:
        for line, printed in zip(DOCS_TABLES, docs_tables(args.results)):
            print(f"$ python -m benchmarks.planted.run --table-only {line}\n{printed}\n")
        return
    seeds = seeds_of(args)
    if args.certainty:
        print(certainty_table(Record(args.results), seeds, args.strategies))
        return
    quiet()
    if not args.table_only:
        if args.jobs == 1:
            for seed in seeds:
                run_task(seed, args.strategies, args.work, args.results)
        else:
            # Each task appends whole lines under a lock, so tasks run side by side.
            # Spawned, not forked: a fork of a process that has run torch can hang.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=one_thread) as pool:
                futures = [pool.submit(run_task, seed, args.strategies, args.work, args.results) for seed in seeds]
                for future in futures:
                    future.result()
    print(tables(Record(args.results), seeds, args.strategies))


if __name__ == "__main__":
    main()
