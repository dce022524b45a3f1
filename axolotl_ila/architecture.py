"""What a model is made of, as far as ILA cares: the units LoRA can adapt.

Two kinds of unit:

- linear modules: ``nn.Linear`` (and its quantized subclasses) and transformers'
  ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``: a linear layer whose
  weight is stored transposed), adapted by PEFT through ``target_modules``;
- expert parameters: the fused 3-D weights of a mixture-of-experts block
  (``model.layers.3.mlp.experts.gate_up_proj``, one slice per expert), adapted
  by PEFT through ``target_parameters`` (axolotl's ``lora_target_parameters``).

Names are always the base model's own names (``model.layers.0.self_attn.q_proj``;
an expert parameter is its module's name plus the parameter's), never PEFT-wrapped
ones, so that a ranking made on one run applies to the next whatever adapter
wraps the model.
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
class ModelUnit:
    """One unit of the base model: a linear module, or an expert parameter
    (``experts`` set: a stack of ``experts`` weights of ``out x in`` each)."""

    name: str
    in_features: int
    out_features: int
    experts: int | None = None

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


def _is_conv1d(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def is_linear(module: torch.nn.Module) -> bool:
    """axolotl's notion of "linear" (``find_all_linear_names``), plus ``Conv1D``.

    bitsandbytes' ``Linear4bit``/``Linear8bitLt`` subclass ``nn.Linear``; other
    quantized linears carry "Linear" in the class name. axolotl's
    ``lora_target_linear`` does not find ``Conv1D``, but PEFT adapts it when
    ``lora_target_modules`` names it, so it is a unit all the same.
    """
    if isinstance(module, torch.nn.Linear) or _is_conv1d(module):
        return True
    cls_name = type(module).__name__
    return "Linear" in cls_name and "Rotary" not in cls_name and hasattr(module, "in_features")


def _features(module: torch.nn.Module) -> tuple[int, int]:
    if _is_conv1d(module):
        return int(module.nx), int(module.nf)  # weight is nx x nf: in x out
    return int(module.in_features), int(module.out_features)


def strip_peft_prefix(name: str) -> str:
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


def model_units(model: torch.nn.Module) -> list[ModelUnit]:
    """Linear modules and expert parameters of a (not yet PEFT-wrapped) model,
    in model order."""
    found = []
    for name, module in model.named_modules():
        # PEFT's LoRA layers contain nn.Linear children (lora_A, lora_B) and a
        # base_layer; an unwrapped base model has none of them.
        if not name or ".lora_" in name or name.endswith(".base_layer"):
            continue
        if is_linear(module):
            in_features, out_features = _features(module)
            found.append(ModelUnit(strip_peft_prefix(name), in_features, out_features))
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if param.ndim == 3:  # experts x out x in, as F.linear(x, weight[e]) reads it
                experts, out_features, in_features = param.shape
                found.append(ModelUnit(f"{strip_peft_prefix(name)}.{param_name}", int(in_features), int(out_features), int(experts)))
    return found


def linear_modules(model: torch.nn.Module) -> list[ModelUnit]:
    """All linear modules of a (not yet PEFT-wrapped) model, in model order."""
    return [unit for unit in model_units(model) if unit.experts is None]


def fingerprint(modules: list[ModelUnit]) -> str:
    """Hash of the units' names and shapes, independent of dtype and
    quantization, so a ranking made in bf16 LoRA serves a 4-bit QLoRA run.
    A model without expert parameters hashes exactly its linear modules."""
    digest = hashlib.sha256()
    for module in sorted(modules, key=lambda m: m.name):
        experts = f"{module.experts}x" if module.experts is not None else ""
        digest.update(f"{module.name}:{experts}{module.in_features}x{module.out_features}\n".encode())
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
