"""Putting a selection into effect on the model axolotl builds, and proving it.

LoRA / QLoRA: the dropped modules go into PEFT's ``exclude_modules`` before the
adapters are created, so no adapter (and no optimizer state) exists for them.
Full fine-tuning: the dropped linear weights are frozen.
Either way, after loading we check that what is adapted (or trainable) is
exactly the selection; axolotl's Spectrum plugin shows what happens otherwise
(patterns that silently match nothing, and a run that trains nothing).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from axolotl_ila.architecture import LinearModule, linear_modules, strip_peft_prefix
from axolotl_ila.selection import Selection


class ApplicationError(RuntimeError):
    """The model does not carry the selection it was meant to."""


def skeleton_model(cfg: Any) -> torch.nn.Module:
    """The model's module tree on the meta device: names and shapes, no weights.

    Lets us check a ranking against the architecture before anything expensive
    (datasets, weights) is loaded.
    """
    import transformers
    from axolotl.loaders.utils import load_model_config

    config = load_model_config(cfg)
    loader_name = cfg.type_of_model or "AutoModelForCausalLM"
    loader = getattr(transformers, loader_name, transformers.AutoModelForCausalLM)
    with torch.device("meta"):
        return loader.from_config(config, trust_remote_code=bool(cfg.trust_remote_code))


def user_excludes(cfg: Any) -> list[str] | str | None:
    """The user's own ``lora_exclude_modules``, before ILA adds to it."""
    if "ila_user_exclude_modules" in cfg:
        return cfg["ila_user_exclude_modules"]
    return cfg.get("lora_exclude_modules") or None


def _lora_target_config(model: torch.nn.Module, cfg: Any):
    """A LoraConfig with exactly the user's target rules (modules, linear,
    layers_to_transform, excludes, modules_to_save), to ask PEFT which modules
    it would wrap."""
    from axolotl.loaders.adapter import find_all_linear_names
    from peft import LoraConfig

    targets = cfg.lora_target_modules or []
    # Full fine-tuning without LoRA targets: the candidates are what
    # ``lora_target_linear: true`` would adapt (every linear module but the head).
    target_linear = cfg.lora_target_linear or (not cfg.adapter and not targets)
    if target_linear:
        # As axolotl does: a string target joins the list (and stops being a regex).
        as_list = list(targets) if isinstance(targets, (list, tuple)) else [targets] if targets else []
        targets = sorted(set(as_list) | set(find_all_linear_names(model)))
    # Otherwise a string stays a string, which PEFT reads as a full-match regex.
    if not targets:
        return None
    return LoraConfig(
        r=8,
        target_modules=targets,
        layers_to_transform=cfg.peft_layers_to_transform,
        layers_pattern=cfg.peft_layers_pattern,
        exclude_modules=user_excludes(cfg),
        modules_to_save=cfg.lora_modules_to_save or None,
    )


def target_candidates(model: torch.nn.Module, cfg: Any) -> list[LinearModule]:
    """The linear modules the user's LoRA config would adapt, in model order."""
    from peft.tuners.tuners_utils import check_target_module_exists

    lora_config = _lora_target_config(model, cfg)
    if lora_config is None:
        return []
    return [m for m in linear_modules(model) if check_target_module_exists(lora_config, m.name)]


def exclude_value(existing: list[str] | str | None, dropped: tuple[str, ...]) -> list[str] | str:
    """PEFT ``exclude_modules`` that adds the dropped modules to the user's own.

    PEFT reads a list as exact names or dotted suffixes, and a string as one
    full-match regex; a user regex is kept by joining both into one regex.
    """
    if isinstance(existing, str):
        ours = "|".join(re.escape(name) for name in dropped)
        return f"(?:{existing})|(?:{ours})"
    return list(existing or []) + list(dropped)


def adapted_modules(model: torch.nn.Module) -> set[str]:
    """Base-model names of the modules that carry a LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {strip_peft_prefix(name) for name, module in model.named_modules() if isinstance(module, LoraLayer)}


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


def freeze_dropped(model: torch.nn.Module, selection: Selection) -> None:
    """Full fine-tuning: the dropped linear modules' own weights stop training."""
    for name in selection.dropped:
        for param in model.get_submodule(name).parameters(recurse=False):
            param.requires_grad_(False)


def verify_trainable(model: torch.nn.Module, selection: Selection) -> None:
    """Full fine-tuning: among the candidates, exactly the kept ones train."""
    candidates = set(selection.kept) | set(selection.dropped)
    actual = set()
    for name, module in model.named_modules():
        base = strip_peft_prefix(name)
        if base in candidates and any(p.requires_grad for p in module.parameters(recurse=False)):
            actual.add(base)
    expected = set(selection.kept)
    if actual != expected:
        raise ApplicationError(_mismatch("trainable", expected, actual))
