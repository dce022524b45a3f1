"""Score one model (a base folder, optionally with a LoRA adapter) for the retention study.

    python -m benchmarks.retention.score --model MODEL_DIR [--adapter RUN_DIR] \\
        --retention-data data/retention --tasks ila_arc_easy ila_piqa \\
        --loss-data data/bench/manpages data/bench/stdlib-docs --out scores.json

Two kinds of numbers:

- benchmarks: lm-eval (lm-evaluation-harness) runs the task definitions in
  ``benchmarks/retention/tasks/`` over the jsonl subsets that
  ``benchmarks.retention.data`` wrote, scoring each choice by its log-likelihood
  (acc, and acc_norm: length-normalised). Every item's 0/1 result is kept so
  that two variants can be compared item by item.
- held-out loss: mean negative log-likelihood per response token of each
  dataset's ``eval.jsonl``, in axolotl's alpaca prompt (its own prompter), loss
  on the response and end-of-sequence token only, as axolotl trains with
  ``train_on_inputs: false``. Rows are cut (not dropped) at ``--sequence-len``
  so that every variant is scored on the same rows.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TASKS = ("ila_hellaswag", "ila_arc_easy", "ila_arc_challenge", "ila_piqa", "ila_mmlu")


def load_model(model_dir: Path, adapter: Path | None = None):
    """The base model, with the adapter merged in (scoring then costs what the base costs)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        if not (adapter / "adapter_config.json").exists():
            raise SystemExit(f"no LoRA adapter in {adapter} (adapter_config.json missing); did the training run finish?")
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    return model, tokenizer


def benchmark_scores(model, tokenizer, tasks: list[str], data_dir: Path, batch_size: int = 16) -> dict[str, Any]:
    """lm-eval over the local tasks: {task: {"acc", "acc_norm", "items": {id: [acc, acc_norm]}}}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    specs = []
    for task in tasks:
        path = (data_dir / f"{task.removeprefix('ila_')}.jsonl").resolve()
        if not path.exists():
            raise SystemExit(f"no benchmark data {path}; run python -m benchmarks.retention.data --out {data_dir}")
        specs.append({"task": task, "dataset_kwargs": {"data_files": {"test": str(path)}}})
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
    out = simple_evaluate(
        model=lm, tasks=specs, task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),  # ours only: indexing all of lm-eval's takes long
        log_samples=True, bootstrap_iters=0, verbosity="ERROR",
    )
    scores = {}
    for task in tasks:
        items = {s["doc"]["id"]: [float(s["acc"]), float(s["acc_norm"])] for s in out["samples"][task]}
        metrics = out["results"][task]
        scores[task] = {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"], "items": items}
    return scores


def alpaca_rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def heldout_loss(model, tokenizer, rows: list[dict[str, str]], sequence_len: int = 128, batch_size: int = 8) -> float:
    """Mean NLL per response token, prompts as axolotl's ``type: alpaca`` writes them."""
    import torch
    from axolotl.prompters import AlpacaPrompter

    prompter = AlpacaPrompter()
    examples = []
    for row in rows:
        prompt = next(prompter.build_prompt(row["instruction"], row.get("input") or None))
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt_ids + response_ids)[:sequence_len]
        labels = ([-100] * len(prompt_ids) + response_ids)[:sequence_len]
        if any(label != -100 for label in labels[1:]):
            examples.append((ids, labels))
    if not examples:
        raise SystemExit(f"no response token fits in {sequence_len} tokens; raise --sequence-len")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
            labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in batch])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
            total += nll.item()
            count += int((target != -100).sum())
    return total / count


def evaluate(model_dir: Path, adapter: Path | None, tasks: list[str], retention_data: Path, loss_data: list[Path], sequence_len: int = 128, loss_rows: int | None = None) -> dict[str, Any]:
    """Held-out losses (the first ``loss_rows`` rows of each eval.jsonl; all if None) and benchmark scores."""
    model, tokenizer = load_model(model_dir, adapter)
    losses = {d.name: heldout_loss(model, tokenizer, alpaca_rows(d / "eval.jsonl")[:loss_rows], sequence_len) for d in loss_data}
    if any(not math.isfinite(v) for v in losses.values()):
        raise SystemExit(f"non-finite held-out loss {losses} for {adapter or model_dir}")
    return {"loss": losses, "benchmarks": benchmark_scores(model, tokenizer, tasks, retention_data) if tasks else {}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--adapter", type=Path, help="a training run's output_dir holding the LoRA adapter")
    parser.add_argument("--retention-data", type=Path, default=Path("data/retention"))
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--loss-data", type=Path, nargs="*", default=[], help="dataset folders with eval.jsonl")
    parser.add_argument("--sequence-len", type=int, default=128)
    parser.add_argument("--loss-rows", type=int, help="score only the first N rows of each eval.jsonl (default: all)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    scores = evaluate(args.model, args.adapter, args.tasks, args.retention_data, args.loss_data, args.sequence_len, args.loss_rows)
    from axolotl_ila.atomic import write_json_atomic

    write_json_atomic(args.out, scores)
    for name, loss in scores["loss"].items():
        print(f"loss {name}: {loss:.4f}")
    for task, s in scores["benchmarks"].items():
        print(f"{task}: acc {s['acc']:.3f} acc_norm {s['acc_norm']:.3f} ({len(s['items'])} items)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
