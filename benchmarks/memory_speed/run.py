"""Memory and step time: LoRA on every linear module versus ILA's selections.

    python -m benchmarks.memory_speed.run --model DIR --ranking RANKING.json
    python -m benchmarks.memory_speed.run --model random-llama-1b --strategy random

Each variant runs in a fresh subprocess (so peak memory is its own): the model is
loaded, PEFT LoRA is applied the way the plugin applies it (every linear module
targeted, the dropped ones in ``exclude_modules``), and a few AdamW training
steps run on random tokens. Printed per variant: adapted modules, trainable
parameters, optimizer state, peak memory (CUDA: ``max_memory_allocated``; CPU:
the process's peak RSS, which includes the model weights) and mean step time,
with ratios to all-module LoRA.

Where savings come from: (1) adapter weights, their gradients and AdamW's two
moments exist only for kept modules; (2) activations kept for backward: a
dropped module's LoRA branch stores no input for its A/B matmuls; (3) how deep
backward has to go: gradients need not flow below the shallowest module that
carries an adapter, so dropping early blocks shortens backward (autograd skips
subgraphs that need no gradient).

``--profile`` (CPU) profiles one more step per variant and splits its op time
into the base model's matmuls (forward, and input gradients in backward), the
LoRA branches' matmuls (recognised by the LoRA rank as a matrix dimension), the
optimizer step, and everything else (attention, norms, activations, the LoRA
branches' casts, dropout and adds, losses, copies).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Llama-shaped configs with random weights (no download); names are ours.
RANDOM_SHAPES = {
    "random-llama-tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8),
    "random-llama-400m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16),
    "random-llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16),
    # The paper's Table 7 setting (Llama-2-7B shapes), for a GPU.
    "random-llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
}
VARIANTS = [("all", None, None), ("keep 0.3", None, 0.3), ("drop 0.25", 0.25, None)]


def current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
    """Peak resident memory while training, sampled every 2 ms on CPU (the
    process's lifetime peak would include transient load-time copies)."""

    def __init__(self):
        import threading

        self.peak = current_rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, current_rss_mib())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, current_rss_mib())


def train_dtype(device: str):
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def load_model(model: str, adapter: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    dtype = train_dtype(device)
    quant = None
    if adapter == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    if model in RANDOM_SHAPES:
        config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **RANDOM_SHAPES[model])
        torch.manual_seed(0)
        if quant is None:
            with torch.device(device):
                return AutoModelForCausalLM.from_config(config, dtype=dtype)
        # 4-bit quantization happens at load: save the random model once, load it quantized.
        cache = Path(os.environ.get("ILA_BENCH_CACHE", "/tmp/ila-bench")) / model
        if not (cache / "config.json").exists():
            with torch.device(device):  # random init is much faster on a GPU
                AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(str(cache))
            if device == "cuda":
                torch.cuda.empty_cache()
        model = str(cache)
    return AutoModelForCausalLM.from_pretrained(
        model, dtype=dtype, quantization_config=quant, device_map={"": device} if device == "cuda" or quant else None
    )


def selection_for(model, ranking: str | None, strategy: str, drop: float | None, keep: float | None):
    """Candidates as ``lora_target_linear: true`` sees them, then the plugin's rule."""
    from axolotl_ila.architecture import linear_modules
    from axolotl_ila.ranking.file import load_ranking
    from axolotl_ila.selection import importance_order, select

    candidates = [m.name for m in linear_modules(model) if m.name != "lm_head"]
    if drop is None and keep is None:
        return candidates, []
    loaded = load_ranking(ranking) if ranking else None
    order = importance_order(candidates, strategy, ranking=loaded, seed=0)
    chosen = select(candidates, order, strategy, drop_fraction=drop, keep_fraction=keep)
    return list(chosen.kept), list(chosen.dropped)


MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def profile_step(step, rank: int) -> dict:
    """One step under torch.profiler: its op time (self CPU time, seconds) by
    where it goes. A matmul is LoRA's when one of its matrix dimensions is the
    LoRA rank (every base dimension here is far larger). One step only: six
    profiled steps of the 400M model filled the 24 GiB machine."""
    from torch.profiler import ProfilerActivity, profile, record_function

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step(record=record_function)
    wall_s = time.perf_counter() - start
    events = prof.events()
    in_optimizer = set()
    for event in events:
        if event.name == "ila_optimizer_step":
            in_optimizer.add(id(event))
            in_optimizer.update(id(child) for child in _descendants(event))
    parts = {"base_matmul_s": 0.0, "lora_matmul_s": 0.0, "optimizer_s": 0.0, "other_s": 0.0}
    for event in events:
        self_s = event.self_cpu_time_total / 1e6
        if id(event) in in_optimizer:
            parts["optimizer_s"] += self_s
        elif event.name in MATMULS:
            dims = [d for shape in event.input_shapes if len(shape) >= 2 for d in shape[-2:]]
            parts["lora_matmul_s" if rank in dims else "base_matmul_s"] += self_s
        else:
            parts["other_s"] += self_s
    parts["profiled_step_s"] = wall_s
    return parts


def _descendants(event):
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def run_variant(args) -> dict:
    """One variant, in this (fresh) process."""
    import torch
    from peft import LoraConfig, get_peft_model

    device = args.device
    model = load_model(args.model, args.adapter, device)
    kept, dropped = selection_for(model, args.ranking, args.strategy, args.drop, args.keep)
    if args.adapter == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        # prepare_model_for_kbit_training upcasts every non-quantized weight to fp32;
        # axolotl then casts norms and embeddings back to the training dtype
        # (loaders/model.py), so the residual stream stays in bf16. Do the same.
        for name, module in model.named_modules():
            if "norm" in name or name.endswith(("embed_tokens", "lm_head")):
                module.to(train_dtype(device))
    targets = sorted({name.rsplit(".", 1)[-1] for name in kept + dropped})
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, exclude_modules=dropped or None, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    if device == "cpu":
        model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    torch.manual_seed(0)
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch, args.seq), device=device)

    def step(record=None):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if record is None:
            optimizer.step()
        else:
            with record("ila_optimizer_step"):
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loaded_mib = torch.cuda.memory_allocated() / 2**20
        sampler = None
    else:
        loaded_mib = current_rss_mib()
        sampler = RssSampler()
    step()  # warm-up: allocates optimizer state, first-call overheads
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = sampler.stop()
    profiled = profile_step(step, args.rank) if args.profile else {}
    optimizer_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return {
        "adapted": len(kept),
        "candidates": len(kept) + len(dropped),
        "trainable_params": sum(p.numel() for p in params),
        "optimizer_mib": optimizer_bytes / 2**20,
        "peak_mib": peak_mib,
        "training_mib": peak_mib - loaded_mib,
        "step_s": sum(times) / len(times),
        **profiled,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help=f"model folder, or one of {', '.join(RANDOM_SHAPES)}")
    parser.add_argument("--ranking", help="ranking JSON for the ila variants (default: --strategy without a ranking)")
    parser.add_argument("--strategy", default="ila", help="ila needs --ranking; random/first/last/mid_block do not")
    parser.add_argument("--adapters", default="lora,qlora")
    parser.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("",) else "cpu")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--profile", action="store_true", help="CPU: also profile one more step and split its op time by where it goes")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    # internal: run one variant and print its JSON
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--drop", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.strategy in ("ila", "update_norm") and not args.ranking:
        parser.error(f"--strategy {args.strategy} needs --ranking")

    if args.profile and args.device != "cpu":
        parser.error("--profile splits CPU op time; run it with --device cpu")

    if args.one:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return 0

    rows = []
    for adapter in args.adapters.split(","):
        for label, drop, keep in VARIANTS:
            cmd = [sys.executable, "-m", __spec__.name, "--one", "--model", args.model, "--adapter", adapter, "--strategy", args.strategy,
                   "--device", args.device, "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps), "--rank", str(args.rank)]
            cmd += ["--ranking", args.ranking] if args.ranking else []
            cmd += ["--profile"] if args.profile else []
            cmd += ["--drop", str(drop)] if drop is not None else []
            cmd += ["--keep", str(keep)] if keep is not None else []
            done = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"variant {adapter}/{label} failed")
            rows.append({"adapter": adapter, "variant": label, **json.loads(lines[-1][7:])})
            print(f"  measured {adapter} / {label}", file=sys.stderr, flush=True)

    selection = f"{args.strategy}" + (f" ({Path(args.ranking).name})" if args.ranking else "")
    print(f"\nmodel {args.model}, device {args.device}, batch {args.batch} x {args.seq} tokens, LoRA r={args.rank}, selection {selection}, {args.steps} timed steps")
    kind = "GPU allocated" if args.device == "cuda" else "RSS"
    print(f"| adapter | variant | adapted | trainable params | optimizer MiB | peak {kind} MiB | peak vs all | training MiB (peak - loaded) | training vs all | step s | step vs all |")
    print("|" + "---|" * 11)
    for row in rows:
        base = next(r for r in rows if r["adapter"] == row["adapter"] and r["variant"] == "all")
        print(
            f"| {row['adapter']} | {row['variant']}{'' if row['variant'] == 'all' else f' ({args.strategy})'} | "
            f"{row['adapted']}/{row['candidates']} | {row['trainable_params']:,} | "
            f"{row['optimizer_mib']:.1f} | {row['peak_mib']:.0f} | {row['peak_mib'] / base['peak_mib']:.3f} | "
            f"{row['training_mib']:.0f} | {row['training_mib'] / base['training_mib']:.3f} | "
            f"{row['step_s']:.3f} | {row['step_s'] / base['step_s']:.3f} |"
        )
    if args.profile:
        print_profile(rows, args.strategy)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def print_profile(rows: list[dict], strategy: str) -> None:
    parts = [("base_matmul_s", "base matmuls s"), ("lora_matmul_s", "LoRA matmuls s"), ("optimizer_s", "optimizer s"), ("other_s", "everything else s")]
    print("\nstep time (timed steps), and the op time of one profiled step (self CPU time) by where it goes")
    print("| adapter | variant | step s | step vs all | " + " | ".join(label for _, label in parts) + " | op total s | profiled step wall s |")
    print("|" + "---|" * (len(parts) + 6))
    for row in rows:
        base = next(r for r in rows if r["adapter"] == row["adapter"] and r["variant"] == "all")
        total = sum(row[key] for key, _ in parts)
        cells = " | ".join(f"{row[key]:.2f} ({row[key] / total:.0%})" for key, _ in parts)
        variant = row["variant"] + ("" if row["variant"] == "all" else f" ({strategy})")
        print(
            f"| {row['adapter']} | {variant} | {row['step_s']:.3f} | {row['step_s'] / base['step_s']:.3f} | "
            f"{cells} | {total:.2f} | {row['profiled_step_s']:.2f} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
