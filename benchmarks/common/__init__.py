"""Shared pieces of the real-model benchmarks: configs for SmolLM2 and the
datasets made by ``build_datasets``, and runners for searches and training
in fresh processes (the same commands a user types)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from axolotl_ila.cli.workspace import CPU_TRAINING

# The ILA settings each quality and retention variant adds to a config; every
# drop-25% baseline drops as many modules as ILA.
VARIANTS = {
    "all": {},
    "ila drop .25": {"ila_strategy": "ila", "ila_drop_fraction": 0.25},
    "ila keep .3": {"ila_strategy": "ila", "ila_keep_fraction": 0.3},
    "update_norm": {"ila_strategy": "update_norm", "ila_drop_fraction": 0.25},
    "random": {"ila_strategy": "random", "ila_drop_fraction": 0.25},
    "first": {"ila_strategy": "first", "ila_drop_fraction": 0.25},
    "last": {"ila_strategy": "last", "ila_drop_fraction": 0.25},
    "mid_block": {"ila_strategy": "mid_block", "ila_drop_fraction": 0.25},
}

ENV = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}

# SmolLM2-135M on the CPU: short sequences keep a step near a second on 2 cores.
SMOLLM2_TRAINING: dict[str, Any] = {
    **CPU_TRAINING,
    "sequence_len": 128,
    "micro_batch_size": 4,
    "lr_scheduler": "cosine",
    "warmup_steps": 2,
    "learning_rate": 0.0005,
    "logging_steps": 1,
    "adapter": "lora",
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "lora_target_linear": True,
}


def config(model: Path, dataset: Path, workdir: Path, name: str, eval_rows: bool = False, **overrides: Any) -> Path:
    """Write an axolotl config for ``dataset`` (a folder with train/eval.jsonl)."""
    cfg: dict[str, Any] = {
        "base_model": str(model),
        "datasets": [{"path": str(dataset / "train.jsonl"), "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str(workdir / "prepared" / dataset.name),
        "val_set_size": 0.0,
        "output_dir": str(workdir / "runs" / name),
        **SMOLLM2_TRAINING,
    }
    if eval_rows:
        cfg["test_datasets"] = [{"path": str(dataset / "eval.jsonl"), "ds_type": "json", "type": "alpaca", "split": "train"}]
        cfg["eval_strategy"] = "no"
    cfg.update(overrides)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = workdir / "configs" / f"{name}.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def run(cmd: list[str], what: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr


def search(config_path: Path) -> None:
    run([sys.executable, "-m", "axolotl_ila.cli", "search", str(config_path)], f"search {config_path.name}")


def search_ranking(model: Path, dataset: Path, workdir: Path, ranking: Path, seed: int, warmup_steps: int = 60, gate_steps: int = 32, planned_steps: int | None = None) -> None:
    """Search ``dataset``'s ranking into ``ranking``, both stages run to their caps so that their lengths are what we say.
    ``planned_steps`` (the run the warm-up is part of; default four warm-ups) sets the learning-rate schedule.
    The gates alone rank (``ila_relearn_steps: 0``), as in the studies' published tables."""
    search(config(
        model, dataset, workdir, ranking.stem, seed=seed, plugins=["axolotl_ila.ILAPlugin"], ila_ranking=str(ranking),
        ila_warmup_max_steps=warmup_steps, ila_warmup_min_steps=warmup_steps, ila_gate_steps=gate_steps,
        ila_gate_min_steps=gate_steps, ila_relearn_steps=0, max_steps=planned_steps or warmup_steps * 4,
    ))


def combine(rankings: list[Path], out: Path, method: str) -> None:
    run([sys.executable, "-m", "axolotl_ila.cli", "combine", *map(str, rankings), "-o", str(out), "--method", method], f"combine --method {method}")


def train(config_path: Path) -> str:
    return run([sys.executable, "-m", "axolotl.cli.train", str(config_path)], f"training {config_path.name}")


def last_metric(log: str, key: str) -> float:
    values = re.findall(rf"'{key}': '?([0-9.]+)", log)
    if not values:
        raise SystemExit(f"no {key} in the training log")
    return float(values[-1])


def compare(rankings: list[Path], top: float = 0.75) -> dict[str, Any]:
    out = run([sys.executable, "-m", "axolotl_ila.cli", "compare", *map(str, rankings), "--top", str(top), "--json"], "compare")
    return json.loads(out[out.index("{") :])


def show_png(ranking: Path, png: Path) -> None:
    run([sys.executable, "-m", "axolotl_ila.cli", "show", str(ranking), "--png", str(png)], "show")
