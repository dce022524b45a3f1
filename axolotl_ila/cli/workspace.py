"""Tiny models, tokenizers and datasets built locally, for the quick start and tests.

Nothing here downloads anything: the tokenizer is trained on the generated data,
the model has random weights. A tiny Llama trains a few steps on CPU in seconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from axolotl_ila.ranking import write_atomic


# llama: separate q/k/v and gate/up/down nn.Linear; gpt_neox: fused query_key_value;
# gpt2: transformers' Conv1D projections (c_attn, c_proj, c_fc); qwen3_moe: a
# mixture of experts whose experts are fused 3-D parameters (transformers 5).
# qwen2: grouped-query attention with q/k/v biases; mistral: grouped-query attention.
ARCHITECTURES = ("llama", "gpt_neox", "gpt2", "qwen3_moe", "qwen2", "mistral")

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


def write_jsonl(path: str | Path, rows: list[dict[str, str]]) -> Path:
    return write_atomic(path, lambda temp: temp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"))


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


def build_model(out_dir: str | Path, architecture: str = "llama", layers: int = 4, hidden: int = 64, vocab_size: int = 1000, seed: int = 0, initializer_range: float = 0.02):
    """A random model of the given family, saved as an ordinary HF folder.

    A larger ``initializer_range`` gives a model with confident (peaked)
    predictions, whose samples carry structure a student can learn.
    """
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3MoeConfig

    shared = dict(
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
    if architecture == "llama":
        config = LlamaConfig(num_key_value_heads=2, **shared)  # grouped-query attention, as in Llama 3
    elif architecture == "qwen2":
        config = Qwen2Config(num_key_value_heads=2, **shared)  # q/k/v carry biases
    elif architecture == "mistral":
        config = MistralConfig(num_key_value_heads=2, **shared)
    elif architecture == "gpt_neox":
        config = GPTNeoXConfig(**shared)  # fused query_key_value, dense_h_to_4h / dense_4h_to_h
    elif architecture == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_inner=hidden * 2,
            n_layer=layers,
            n_head=4,
            n_positions=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
            tie_word_embeddings=False,
            initializer_range=initializer_range,
        )
    elif architecture == "qwen3_moe":
        shared.pop("intermediate_size")
        config = Qwen3MoeConfig(
            num_key_value_heads=2,
            head_dim=hidden // 4,
            intermediate_size=hidden * 2,
            moe_intermediate_size=hidden // 2,
            num_experts=4,
            num_experts_per_tok=2,
            **shared,
        )
    else:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
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
) -> dict[str, Path]:
    """Model folder (weights + tokenizer) and an alpaca jsonl under ``root``."""
    root = Path(root)
    model_dir = root / f"tiny-{architecture}"
    data_path = root / "data" / "train.jsonl"
    data = make_alpaca_rows(rows, seed=seed)
    write_jsonl(data_path, data)
    if not (model_dir / "config.json").exists():
        tokenizer = build_tokenizer(data, model_dir)
        build_model(model_dir, architecture=architecture, layers=layers, vocab_size=len(tokenizer), seed=seed, initializer_range=initializer_range)
    return {"model": model_dir, "data": data_path}


# Preference data. One file layout per family of methods, each a format axolotl
# 0.19 ships a prompt strategy for:
#   pairs (dpo, ipo, simpo: ``chatml.argilla_chat``; orpo: ``chat_template.argilla``):
#       {"chosen": [user turn, assistant turn], "rejected": [user turn, assistant turn]}
#   kto (``chatml.argilla``): {"instruction": ..., "completion": ..., "label": true|false}
PAIR_TYPES = {"dpo": "chatml.argilla_chat", "ipo": "chatml.argilla_chat", "simpo": "chatml.argilla_chat", "orpo": "chat_template.argilla"}
KTO_TYPE = "chatml.argilla"


def _prompt(row: dict[str, str]) -> str:
    return f"{row['instruction']}\n{row['input']}" if row.get("input") else row["instruction"]


def make_preference_rows(n: int, seed: int = 0) -> list[dict[str, object]]:
    """Pairs from the instruction data: the right answer is chosen, the answer
    of another instruction (a different task, so plainly wrong) is rejected."""
    rows = make_alpaca_rows(n, seed=seed)
    rng = random.Random(seed + 1)
    pairs = []
    for i, row in enumerate(rows):
        other = rows[(i + 1 + rng.randrange(n - 1)) % n] if n > 1 else row
        while other["output"] == row["output"] and n > 1:
            other = rows[rng.randrange(n)]
        user = {"role": "user", "content": _prompt(row)}
        pairs.append(
            {
                "chosen": [user, {"role": "assistant", "content": row["output"]}],
                "rejected": [user, {"role": "assistant", "content": other["output"]}],
            }
        )
    return pairs


def make_kto_rows(n: int, seed: int = 0) -> list[dict[str, object]]:
    """KTO rows (unpaired): each pair's chosen answer labelled desirable and
    its rejected answer undesirable, alternately, so both labels occur."""
    rows = []
    for i, pair in enumerate(make_preference_rows(n, seed=seed)):
        desirable = i % 2 == 0
        answer = pair["chosen" if desirable else "rejected"][1]["content"]
        rows.append({"instruction": pair["chosen"][0]["content"], "completion": answer, "label": desirable})
    return rows


def build_preference_data(root: str | Path, rows: int = 64, seed: int = 0) -> dict[str, Path]:
    """``pairs.jsonl`` (dpo, ipo, simpo, orpo) and ``kto.jsonl`` under ``root/data``."""
    root = Path(root)
    return {
        "pairs": write_jsonl(root / "data" / "pairs.jsonl", make_preference_rows(rows, seed=seed)),
        "kto": write_jsonl(root / "data" / "kto.jsonl", make_kto_rows(rows, seed=seed)),
    }
