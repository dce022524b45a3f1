"""The quick start's workspace, built locally: a tiny Llama, its tokenizer, and
instruction data; and the settings axolotl needs to train on a CPU.

Nothing here downloads anything: the tokenizer is trained on the generated data,
the model has random weights. A tiny Llama trains a few steps on CPU in seconds.
The tests and benchmarks build other families on the same pieces
(``benchmarks/common/tiny_models.py``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

from axolotl_ila.atomic import write_jsonl

# What axolotl needs to train on a CPU: no mixed precision, plain AdamW, and
# none of its fused LoRA kernels (GPU only). The quick start, the tests and the
# benchmarks all start from these.
CPU_TRAINING: dict[str, Any] = {
    "optimizer": "adamw_torch",
    "bf16": False,
    "fp16": False,
    "tf32": False,
    "lora_mlp_kernel": False,
    "lora_qkv_kernel": False,
    "lora_o_kernel": False,
    "sample_packing": False,
    "gradient_accumulation_steps": 1,
    "save_strategy": "no",
}

_SUBJECTS = ["cat", "dog", "river", "mountain", "teacher", "robot", "garden", "city", "ocean", "forest"]
_VERBS = ["sees", "likes", "follows", "builds", "paints", "finds", "carries", "visits", "watches", "helps"]
_OBJECTS = ["a ball", "the moon", "a song", "the bridge", "a letter", "the tower", "a map", "the boat", "a key", "the lamp"]


def make_alpaca_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Small instruction data with learnable structure: reverse, repeat, count."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        sentence = f"the {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        task = rng.randrange(3)
        if task == 0:
            rows.append({"instruction": "Reverse the words.", "input": sentence, "output": " ".join(reversed(sentence.split()))})
        elif task == 1:
            rows.append({"instruction": "Repeat the sentence twice.", "input": sentence, "output": f"{sentence}. {sentence}."})
        else:
            rows.append({"instruction": "How many words are there?", "input": sentence, "output": str(len(sentence.split()))})
    return rows


def build_tokenizer(rows: list[dict[str, str]], out_dir: str | Path, vocab_size: int = 1000):
    """A byte-level BPE tokenizer trained on the rows, saved as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(r.values()) for r in rows] + [
        # axolotl's alpaca prompt, so that prompts tokenize to a few dozen tokens
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.",
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.",
        "\n\n### Instruction:\n ### Input:\n ### Response:\n",
    ] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.save_pretrained(str(out_dir))
    return fast


def llama_config(vocab_size: int, layers: int = 4, hidden: int = 64, initializer_range: float = 0.02):
    """A tiny Llama: separate q/k/v and gate/up/down, grouped-query attention as in Llama 3."""
    from transformers import LlamaConfig

    return LlamaConfig(num_key_value_heads=2, **tiny_config_fields(vocab_size, layers, hidden, initializer_range))


def tiny_config_fields(vocab_size: int, layers: int, hidden: int, initializer_range: float) -> dict[str, Any]:
    """The sizes every tiny model shares. A larger ``initializer_range`` gives a
    model with confident (peaked) predictions, whose samples carry structure a
    student can learn."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )


def save_random_model(config: Any, out_dir: str | Path, seed: int = 0):
    """A model of ``config`` with random weights (seeded), saved as an ordinary HF folder."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out_dir))
    return model


def build_workspace(
    root: str | Path,
    architecture: str = "llama",
    rows: int = 256,
    layers: int = 4,
    seed: int = 0,
    initializer_range: float = 0.02,
    model_config: Callable[..., Any] = llama_config,
) -> dict[str, Path]:
    """Model folder (weights + tokenizer) and an alpaca jsonl under ``root``.
    ``model_config(vocab_size, layers=, initializer_range=)`` gives the model's
    config (a Llama unless told otherwise); ``architecture`` names its folder."""
    root = Path(root)
    model_dir = root / f"tiny-{architecture}"
    data_path = root / "data" / "train.jsonl"
    data = make_alpaca_rows(rows, seed=seed)
    write_jsonl(data_path, data)
    if not (model_dir / "config.json").exists():
        tokenizer = build_tokenizer(data, model_dir)
        config = model_config(len(tokenizer), layers=layers, initializer_range=initializer_range)
        save_random_model(config, model_dir, seed=seed)
    return {"model": model_dir, "data": data_path}
