"""Tiny random models of every family the tests and the planted study use,
built on the quick start's workspace (``axolotl_ila.cli.workspace``).

llama: separate q/k/v and gate/up/down nn.Linear; gpt_neox: fused
query_key_value; gpt2: transformers' Conv1D projections (c_attn, c_proj, c_fc);
qwen3_moe: a mixture of experts whose experts are fused 3-D parameters
(transformers 5); qwen2: grouped-query attention with q/k/v biases; mistral:
grouped-query attention.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from axolotl_ila.cli import workspace
from axolotl_ila.cli.workspace import llama_config, save_random_model, tiny_config_fields

ARCHITECTURES = ("llama", "gpt_neox", "gpt2", "qwen3_moe", "qwen2", "mistral")


def model_config(architecture: str, vocab_size: int, layers: int = 4, hidden: int = 64, initializer_range: float = 0.02):
    from transformers import GPT2Config, GPTNeoXConfig, MistralConfig, Qwen2Config, Qwen3MoeConfig

    shared = tiny_config_fields(vocab_size, layers, hidden, initializer_range)
    if architecture == "llama":
        return llama_config(vocab_size, layers, hidden, initializer_range)
    if architecture == "qwen2":
        return Qwen2Config(num_key_value_heads=2, **shared)  # q/k/v carry biases
    if architecture == "mistral":
        return MistralConfig(num_key_value_heads=2, **shared)
    if architecture == "gpt_neox":
        return GPTNeoXConfig(**shared)  # fused query_key_value, dense_h_to_4h / dense_4h_to_h
    if architecture == "gpt2":
        return GPT2Config(
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
    if architecture == "qwen3_moe":
        shared.pop("intermediate_size")
        return Qwen3MoeConfig(
            num_key_value_heads=2,
            head_dim=hidden // 4,
            intermediate_size=hidden * 2,
            moe_intermediate_size=hidden // 2,
            num_experts=4,
            num_experts_per_tok=2,
            **shared,
        )
    raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")


def build_model(out_dir: str | Path, architecture: str = "llama", layers: int = 4, hidden: int = 64, vocab_size: int = 1000, seed: int = 0, initializer_range: float = 0.02):
    """A random model of the given family, saved as an ordinary HF folder."""
    config = model_config(architecture, vocab_size, layers, hidden, initializer_range)
    return save_random_model(config, out_dir, seed=seed)


def build_workspace(root: str | Path, architecture: str = "llama", rows: int = 256, layers: int = 4, seed: int = 0, initializer_range: float = 0.02) -> dict[str, Path]:
    """Model folder (weights + tokenizer) and an alpaca jsonl under ``root``."""
    return workspace.build_workspace(
        root, architecture, rows=rows, layers=layers, seed=seed, initializer_range=initializer_range, model_config=partial(model_config, architecture)
    )
