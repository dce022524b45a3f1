"""What the search's ranking buys on planted tasks, asserted as keep-k regret.

A planted task (``axolotl_ila.planted``) is a tiny base model whose teacher
adds low-rank deltas to a few modules; the data are the teacher's samples.
Its truth is measured: the held-out loss of LoRA on the planted modules,
trained for the task's planned steps. The search runs on the base exactly as
``axolotl-ila search`` runs it (a fresh process, every ``ila_`` key at its
default), and LoRA on its top k (k = the number of planted modules), trained
the same way, must come within a margin of that loss: the keep-k regret. The
planted modules are no answer key (another module can train better within the
steps), so the tests do not ask for them by name.

The tasks are tasks of the benchmark suite (``benchmarks/planted``): three
families, a short run (150-250 planned steps) and a long one (400+). Their
margins come from the suite's measured distribution (docs/planted.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from axolotl_ila.planted import PlantedTask, build_task, load_json, measure_truth, random_task, search_config, train_lora, write_config

# name: (task, the largest keep-k regret accepted)
CI_TASKS: dict[str, tuple[PlantedTask, float]] = {}


def run_search(config: Path) -> None:
    code = f"from axolotl_ila.plugin import search_config_file; search_config_file({str(config)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=config.parent, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]


def keep_k_regret(task: PlantedTask, root: Path) -> tuple[float, dict]:
    files = build_task(task, root / "task")
    planted_loss = train_lora(files, task, task.planted)
    ranking_path = root / "ranking.json"
    run_search(write_config(search_config(task, files, root, ranking_path), root / "search.yml"))
    ranking = load_json(ranking_path)
    top = [m["name"] for m in ranking["modules"]][: task.k]
    return train_lora(files, task, top) - planted_loss, ranking
