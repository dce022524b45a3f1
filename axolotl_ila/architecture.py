"""What a model is made of, as far as ILA cares: its linear modules.

Module names are always the base model's own ``named_modules()`` names
(``model.layers.0.self_attn.q_proj``), never PEFT-wrapped ones, so that a ranking
made on one run applies to the next whatever adapter wraps the model.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch

# PEFT wraps the base model as ``base_model.model.<name>``; strip it to get back
# to the base model's own names.
_PEFT_PREFIX = "base_model.model."

# The first purely numeric path component is the transformer block index:
# ``model.layers.7.mlp.down_proj`` -> 7, ``transformer.h.3.attn.c_attn`` -> 3.
_BLOCK_RE = re.compile(r"(?:^|\.)(\d+)\.")


@dataclass(frozen=True)
class LinearModule:
    """One linear module of the base model."""

    name: str
    in_features: int
    out_features: int

    @property
    def block(self) -> int | None:
        return block_index(self.name)

    @property
    def kind(self) -> str:
        return module_kind(self.name)


def block_index(name: str) -> int | None:
    """Transformer block a module lives in, or None (``lm_head``)."""
    match = _BLOCK_RE.search(name)
    return int(match.group(1)) if match else None


def module_kind(name: str) -> str:
    """The module's role, its name without the block prefix (``mlp.down_proj``)."""
    match = _BLOCK_RE.search(name)
    return name[match.end() :] if match else name


def is_linear(module: torch.nn.Module) -> bool:
    """Same notion of "linear" as axolotl's ``find_all_linear_names``.

    bitsandbytes' ``Linear4bit``/``Linear8bitLt`` subclass ``nn.Linear``; other
    quantized linears carry "Linear" in the class name.
    """
    if isinstance(module, torch.nn.Linear):
        return True
    cls_name = type(module).__name__
    return "Linear" in cls_name and "Rotary" not in cls_name and hasattr(module, "in_features")


def strip_peft_prefix(name: str) -> str:
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


def linear_modules(model: torch.nn.Module) -> list[LinearModule]:
    """All linear modules of a (not yet PEFT-wrapped) model, in model order."""
    found = []
    for name, module in model.named_modules():
        if not name or not is_linear(module):
            continue
        # PEFT's LoRA layers contain nn.Linear children (lora_A, lora_B) and a
        # base_layer; an unwrapped base model has none of them.
        if ".lora_" in name or name.endswith(".base_layer"):
            continue
        found.append(
            LinearModule(
                name=strip_peft_prefix(name),
                in_features=int(module.in_features),
                out_features=int(module.out_features),
            )
        )
    return found


def fingerprint(modules: list[LinearModule]) -> str:
    """Hash of the linear modules' names and shapes, independent of dtype and
    quantization, so a ranking made in bf16 LoRA serves a 4-bit QLoRA run."""
    digest = hashlib.sha256()
    for module in sorted(modules, key=lambda m: m.name):
        digest.update(f"{module.name}:{module.in_features}x{module.out_features}\n".encode())
    return "sha256:" + digest.hexdigest()


def num_blocks(names: list[str]) -> int:
    blocks = [b for b in map(block_index, names) if b is not None]
    return max(blocks) + 1 if blocks else 0


def depth_order(names: list[str]) -> list[str]:
    """Names sorted shallow to deep; modules outside blocks (lm_head) last."""
    deepest = num_blocks(names)
    position = {name: i for i, name in enumerate(names)}

    def key(name: str) -> tuple[int, int]:
        block = block_index(name)
        return (deepest if block is None else block, position[name])

    return sorted(names, key=key)
