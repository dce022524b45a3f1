"""Putting a selection into effect on the model axolotl builds, and proving it.

LoRA / QLoRA: the dropped modules go into PEFT's ``exclude_modules`` before the
adapters are created, so no adapter (and no optimizer state) exists for them.
PEFT applies ``exclude_modules`` to modules only, so dropped expert parameters
are instead left out of the ``target_parameters`` PEFT receives, which then
lists the kept ones by full name.
Full fine-tuning: the dropped linear weights (and expert parameters) are frozen.
Either way, after loading we check that what is adapted (or trainable) is
exactly the selection; axolotl's Spectrum plugin shows what happens otherwise
(patterns that silently match nothing, and a run that trains nothing).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from axolotl_ila.architecture import strip_peft_prefix
from axolotl_ila.candidates import user_target_parameters
from axolotl_ila.selection import Selection


class ApplicationError(RuntimeError):
    """The model does not carry the selection it was meant to."""


def peft_exclude_modules(existing: list[str] | str | None, dropped: tuple[str, ...]) -> list[str] | str:
    """PEFT ``exclude_modules`` that adds the dropped modules to the user's own.

    PEFT reads a list as exact names or dotted suffixes, and a string as one
    full-match regex; a user regex is kept by joining both into one regex.
    """
    if isinstance(existing, str):
        ours = "|".join(re.escape(name) for name in dropped)
        return f"(?:{existing})|(?:{ours})"
    return list(existing or []) + list(dropped)


def lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    """Base-model unit name -> PEFT LoRA layer, in module-tree order.

    A LoRA on an expert parameter is a ``ParamWrapper`` around the experts
    module; two on the same module nest (``experts``, ``experts.base_layer``),
    so a wrapper is named by its unwrapped module plus its parameter.
    """
    from peft.tuners.lora import LoraLayer, ParamWrapper

    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        name = strip_peft_prefix(name)
        if isinstance(module, ParamWrapper):
            name = f"{name.replace('.base_layer', '')}.{module.parameter_name}"
        layers[name] = module
    return layers


def adapted_modules(model: torch.nn.Module) -> set[str]:
    """Base-model names of the units (modules, expert parameters) that carry a LoRA layer."""
    return set(lora_layers(model))


def peft_target_parameters(cfg: Any, kept_parameters: list[str]) -> list[str] | None:
    """The ``target_parameters`` PEFT receives: the kept expert parameters by
    full name (PEFT has no exclude for parameters), or None without any."""
    if not user_target_parameters(cfg):
        return None
    return list(kept_parameters) or None


def _mismatch(what: str, expected: set[str], actual: set[str]) -> str:
    missing = sorted(expected - actual)
    extra = sorted(actual - expected)
    return (
        f"ILA: the {what} modules are not the selection: {len(missing)} selected modules lack it "
        f"({', '.join(missing[:4])}{'...' if len(missing) > 4 else ''}), {len(extra)} unselected "
        f"have it ({', '.join(extra[:4])}{'...' if len(extra) > 4 else ''}). Training would not do "
        f"what the config asks, so it stops here. Another plugin or setting (lora_target_modules, "
        f"peft_layers_to_transform, unfrozen_parameters) may be changing the adapters; please report "
        f"this with your config if none is."
    )


def verify_adapters(model: torch.nn.Module, selection: Selection) -> None:
    actual = adapted_modules(model)
    expected = set(selection.kept)
    if actual != expected:
        raise ApplicationError(_mismatch("LoRA-adapted", expected, actual))


def _unit_parameters(model: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    """A linear module's own weights, or an expert parameter itself."""
    try:
        return list(model.get_submodule(name).parameters(recurse=False))
    except AttributeError:
        module_name, _, param_name = name.rpartition(".")
        return [getattr(model.get_submodule(module_name), param_name)]


def freeze_dropped(model: torch.nn.Module, selection: Selection) -> None:
    """Full fine-tuning: the dropped units' own weights stop training."""
    for name in selection.dropped:
        for param in _unit_parameters(model, name):
            param.requires_grad_(False)


def trainable_units(model: torch.nn.Module, candidates: set[str]) -> set[str]:
    """The candidate units (modules, expert parameters) with a weight that trains."""
    actual = set()
    for name, module in model.named_modules():
        base = strip_peft_prefix(name)
        if base in candidates and any(p.requires_grad for p in module.parameters(recurse=False)):
            actual.add(base)
        for param_name, param in module.named_parameters(recurse=False):
            if f"{base}.{param_name}" in candidates and param.requires_grad:
                actual.add(f"{base}.{param_name}")
    return actual


def verify_trainable(model: torch.nn.Module, selection: Selection) -> None:
    """Full fine-tuning: among the candidates, exactly the kept ones train."""
    actual = trainable_units(model, set(selection.kept) | set(selection.dropped))
    expected = set(selection.kept)
    if actual != expected:
        raise ApplicationError(_mismatch("trainable", expected, actual))
