"""What the search costs, and whether a longer search would rank differently.

    python -m benchmarks.search_cost.tiny --config CONFIG.yml [--longer 2] [--workdir DIR]

From one axolotl config with the ILA plugin, in fresh processes:

1. the search as configured (``axolotl-ila search``), timed per stage by the
   ranking file itself (``search.stage1.wall_s``, ``search.stage2.wall_s``);
2. a longer search: warm-up cap and gate steps multiplied by ``--longer``;
3. the training run the search serves (``ila_search: never`` on ranking 1),
   timed by the trainer's own ``train_runtime``.

Prints a table of wall times and shares of the training run, and the Jaccard
similarity of the top-75% sets of the two rankings.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from axolotl_ila.ranking.analysis import jaccard, top_set
from axolotl_ila.ranking.file import load_ranking

ENV = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}


def write_variant(base: dict, path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({**base, **changes}, sort_keys=False), encoding="utf-8")
    return path


def search(config: Path) -> None:
    code = f"from axolotl_ila.plugin import search_config_file; search_config_file({str(config)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    if done.returncode != 0:
        raise SystemExit(f"search failed for {config}:\n{done.stderr[-4000:]}")


def train(config: Path) -> float:
    done = subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(config)], capture_output=True, text=True, env=ENV)
    if done.returncode != 0:
        raise SystemExit(f"training failed for {config}:\n{done.stderr[-4000:]}")
    runtimes = re.findall(r"'train_runtime': '?([0-9.]+)", done.stdout + done.stderr)
    if not runtimes:
        raise SystemExit("could not find train_runtime in the training log")
    return float(runtimes[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--longer", type=float, default=2.0, help="factor for the longer search's warm-up cap and gate steps")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/search-cost"))
    args = parser.parse_args(argv)

    base = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    first, longer = work / "ranking.json", work / "ranking-longer.json"
    for path in (first, longer):
        path.unlink(missing_ok=True)

    search(write_variant(base, work / "search.yml", ila_ranking=str(first), output_dir=str(work / "search-out")))
    ranking = load_ranking(first)
    stage1, stage2 = ranking.search["stage1"], ranking.search["stage2"]
    longer_changes = {
        "ila_ranking": str(longer),
        "output_dir": str(work / "search-longer-out"),
        "ila_warmup_max_steps": int(round(stage1["max_steps"] * args.longer)),
        "ila_warmup_min_steps": int(round(stage1["max_steps"] * args.longer)),  # run the whole (longer) cap
        "ila_gate_steps": int(round(stage2["steps"] * args.longer)),
        "ila_gate_min_steps": int(round(stage2["steps"] * args.longer)),
    }
    search(write_variant(base, work / "search-longer.yml", **longer_changes))
    long_ranking = load_ranking(longer)

    runtime = train(write_variant(base, work / "train.yml", ila_ranking=str(first), ila_search="never", output_dir=str(work / "train-out")))
    planned = stage1["planned_training_steps"]

    print(f"\nconfig {args.config}, model {ranking.model.get('base_model')}, {planned} planned training steps")
    print("| phase | steps | wall s | share of training run |")
    print("|---|---|---|---|")
    print(f"| stage 1 warm-up ({stage1['stop_reason']}) | {stage1['steps']} | {stage1['wall_s']:.1f} | {stage1['wall_s'] / runtime:.1%} |")
    print(f"| stage 2 gates | {stage2['steps']} | {stage2['wall_s']:.1f} | {stage2['wall_s'] / runtime:.1%} |")
    total = stage1["wall_s"] + stage2["wall_s"]
    print(f"| search total | | {total:.1f} | {total / runtime:.1%} |")
    print(f"| training run (ILA drop/keep as configured) | {planned} | {runtime:.1f} | 100% |")
    ls1, ls2 = long_ranking.search["stage1"], long_ranking.search["stage2"]
    agreement = jaccard(top_set(ranking, 0.75), top_set(long_ranking, 0.75))
    print(
        f"\nagreement with a {args.longer:g}x longer search ({ls1['steps']} warm-up + {ls2['steps']} gate steps): "
        f"Jaccard of top-75% sets = {agreement:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
