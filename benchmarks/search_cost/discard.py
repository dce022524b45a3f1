"""What should become of the dropped modules' warm-up updates when the training
continues from the warm-up: discarded (what the plugin does) or kept?

    python -m benchmarks.search_cost.discard --first-run bench-out/first-run [--runs manpages:1 ...]

Reads the configs and selections that ``benchmarks.search_cost.first_run`` left in its workdir. For
each DATASET:SEED it trains SmolLM2 with axolotl's own model and trainer, LoRA on
every linear module, with the first run's exact config (data, seed, schedule,
``--steps``), twice. At the step where that first run's warm-up stopped, the
modules its selection dropped stop training, and then

- ``discard``: their LoRA ``B`` is set to zero, so their warm-up update is gone
  (the function a continued run trains, adapters on the kept modules only);
- ``keep``: they stay as they are, frozen (the function a run trains that merges
  those updates into the base weights, or keeps them as frozen adapters).

Everything else is identical between the two (same warm-up, same batches after
it, same optimizer state for the kept modules), so the difference of their
held-out eval losses at the end is what discarding costs. Each variant runs in
a fresh process; results go to WORKDIR/discard.json and a rerun skips what is
there. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from axolotl_ila.atomic import write_json_atomic
from benchmarks.common import ENV

VARIANTS = ("discard", "keep")


def plain_config(config_path: Path, variant: str) -> Path:
    """The first run's config without the plugin: LoRA on every linear module."""
    import yaml

    cfg = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    cfg = {k: v for k, v in cfg.items() if k != "plugins" and not k.startswith("ila_")}
    cfg["output_dir"] = f"{cfg['output_dir']}-discard-{variant}"
    path = config_path.with_name(f"{config_path.stem}-discard-{variant}.yml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def one(config_path: Path, selection_path: Path, switch_step: int, variant: str) -> dict:
    """Train one variant in this process; returns its final eval loss."""
    import torch
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.train import setup_model_and_trainer
    from transformers import TrainerCallback

    from axolotl_ila.application import lora_layers

    cfg = load_cfg(str(plain_config(config_path, variant)))
    meta = load_datasets(cfg=cfg)
    trainer, model, *_ = setup_model_and_trainer(cfg, meta)
    layers = lora_layers(model)
    dropped = json.loads(selection_path.read_text(encoding="utf-8"))["dropped"]
    missing = sorted(set(dropped) - set(layers))
    if missing:
        raise SystemExit(f"{selection_path}: dropped modules without LoRA here: {missing[:3]}")

    class Switch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step != switch_step:
                return
            with torch.no_grad():
                for name in dropped:
                    layer = layers[name]
                    for part in (layer.lora_A["default"], layer.lora_B["default"]):
                        part.weight.requires_grad_(False)
                        part.weight.grad = None
                    if variant == "discard":
                        layer.lora_B["default"].weight.zero_()

    trainer.add_callback(Switch())
    trainer.train()
    loss = trainer.evaluate()["eval_loss"]
    return {"eval_loss": round(float(loss), 5), "switch_step": switch_step, "dropped": len(dropped)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--first-run", required=True, type=Path, help="the --workdir of benchmarks.search_cost.first_run")
    parser.add_argument("--runs", nargs="+", default=["manpages:1"])
    parser.add_argument("--one", nargs=4, metavar=("CONFIG", "SELECTION", "STEP", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        config_path, selection_path, step, variant = args.one
        print("RESULT " + json.dumps(one(Path(config_path), Path(selection_path), int(step), variant)), flush=True)
        return 0

    work = args.first_run.resolve()
    out = work / "discard.json"
    results = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
    for item in args.runs:
        dataset, _, seed = item.partition(":")
        name = f"{dataset}-s{seed}"
        config_path = work / "configs" / f"{name}-first.yml"
        selection_path = work / "runs" / f"{name}-first" / "ila_selection.json"
        ranking_path = work / "rankings" / f"{name}.json"
        for path in (config_path, selection_path, ranking_path):
            if not path.exists():
                raise SystemExit(f"--runs {item}: no {path}; run python -m benchmarks.search_cost.first_run --runs {item} --workdir {args.first_run} first")
        switch_step = json.loads(ranking_path.read_text(encoding="utf-8"))["search"]["stage1"]["steps"]
        for variant in VARIANTS:
            key = f"{name}|{variant}"
            if key in results:
                continue
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", __spec__.name, "--first-run", str(work), "--one", str(config_path), str(selection_path), str(switch_step), variant],
                capture_output=True, text=True, env=ENV,
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise SystemExit(f"{key} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            results[key] = {**json.loads(lines[-1][len("RESULT "):]), "wall_s": round(time.perf_counter() - started, 1)}
            write_json_atomic(out, results)
            print(f"  {key}: {results[key]}", flush=True)

    print(f"\n{platform.node()} ({platform.machine()}), {time.strftime('%Y-%m-%d')}; configs of {work}")
    print("| dataset:seed | switch step | dropped modules | eval loss, warm-up updates discarded | eval loss, kept frozen | discard - keep |")
    print("|---|---|---|---|---|---|")
    for item in args.runs:
        dataset, _, seed = item.partition(":")
        name = f"{dataset}-s{seed}"
        d, k = results[f"{name}|discard"], results[f"{name}|keep"]
        print(f"| {item} | {d['switch_step']} | {d['dropped']} | {d['eval_loss']:.4f} | {k['eval_loss']:.4f} | {d['eval_loss'] - k['eval_loss']:+.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
