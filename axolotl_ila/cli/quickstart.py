"""``axolotl-ila quickstart``: a real ILA training run on a tiny local model.

Builds a tiny random Llama, its tokenizer and a small instruction dataset under
``--dir``, writes the config ``example_configs/tiny-cpu.yml`` shows, and runs
``python -m axolotl.cli.train`` on it: the search runs (no ranking yet), writes
the ranking and its heatmap, and training follows with adapters on the selected
modules only. Takes about a minute on a laptop CPU; downloads nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from axolotl_ila.cli.workspace import CPU_TRAINING, build_workspace

DEFAULT_DIR = "ila-quickstart"


def quickstart_config(root: str = DEFAULT_DIR) -> dict[str, Any]:
    """The tiny CPU config; paths are relative to the directory you run from."""
    return {
        "base_model": f"{root}/tiny-llama",
        "datasets": [{"path": f"{root}/data/train.jsonl", "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": f"{root}/prepared",
        "val_set_size": 0.0,
        "output_dir": f"{root}/outputs/lora-ila",
        "plugins": ["axolotl_ila.ILAPlugin"],
        "ila_ranking": f"{root}/rankings/tiny-llama.json",
        "ila_search": "auto",
        "ila_drop_fraction": 0.25,
        "ila_gate_steps": 32,
        "adapter": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        **CPU_TRAINING,  # no mixed precision, no fused LoRA kernels (GPU only), plain AdamW
        "sequence_len": 128,
        "micro_batch_size": 4,
        "max_steps": 60,
        "learning_rate": 0.002,
        "lr_scheduler": "cosine",
        "logging_steps": 10,
        "seed": 42,
    }


def render_config(root: str = DEFAULT_DIR) -> str:
    header = (
        "# Tiny CPU quick start: `axolotl-ila quickstart` builds the model and data under\n"
        f"# {root}/ and runs `python -m axolotl.cli.train` on this config.\n"
    )
    return header + yaml.safe_dump(quickstart_config(root), sort_keys=False)


def run_quickstart(directory: str = DEFAULT_DIR) -> int:
    root = Path(directory)
    print(f"building a tiny Llama, tokenizer and dataset in {root}/ ...", flush=True)
    build_workspace(root, "llama", rows=512)
    config = root / "config.yml"
    config.write_text(render_config(directory), encoding="utf-8")
    print(f"training: {sys.executable} -m axolotl.cli.train {config}", flush=True)
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": os.environ.get("AXOLOTL_DO_NOT_TRACK", "1")}
    code = subprocess.call([sys.executable, "-m", "axolotl.cli.train", str(config)], env=env)
    if code == 0:
        cfg = quickstart_config(directory)
        print(
            f"\ndone. ranking: {cfg['ila_ranking']} (heatmap next to it), adapters and "
            f"ila_selection.json: {cfg['output_dir']}\n"
            f"look at it: axolotl-ila show {cfg['ila_ranking']}"
        )
    return code
