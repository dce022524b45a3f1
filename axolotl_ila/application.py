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

from axolotl_ila.architecture import LinearModule, model_units, strip_peft_prefix
from axolotl_ila.selection import Selection, SelectionError


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


def user_target_parameters(cfg: Any) -> list[str]:
    """The user's own ``lora_target_parameters``, before ILA narrows it."""
    value = cfg["ila_user_target_parameters"] if "ila_user_target_parameters" in cfg else cfg.get("lora_target_parameters")
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def parameter_matches(name: str, targets: list[str]) -> bool:
    """PEFT's rule for ``target_parameters``: the full name, or a dotted suffix."""
    return any(name == target or name.endswith(f".{target}") for target in targets)


def target_candidates(model: torch.nn.Module, cfg: Any) -> list[LinearModule]:
    """The units the user's LoRA config would adapt, in model order: linear
    modules through ``lora_target_modules``/``lora_target_linear``, expert
    parameters through ``lora_target_parameters``."""
    from peft.tuners.tuners_utils import check_target_module_exists

    lora_config = _lora_target_config(model, cfg)
    parameters = user_target_parameters(cfg)
    candidates = []
    for unit in model_units(model):
        if unit.experts is None:
            if lora_config is not None and check_target_module_exists(lora_config, unit.name):
                candidates.append(unit)
        elif parameter_matches(unit.name, parameters):
            candidates.append(unit)
    if parameters:
        _check_parameter_targets(model, parameters)
    return candidates


def _check_parameter_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Every ``lora_target_parameters`` entry must name expert parameters: ILA
    ranks those as units; any other parameter it could not keep or drop."""
    for target in targets:
        matched = [
            (f"{module_name}.{param_name}" if module_name else param_name, param.ndim)
            for module_name, module in model.named_modules()
            for param_name, param in module.named_parameters(recurse=False)
            if parameter_matches(f"{module_name}.{param_name}" if module_name else param_name, [target])
        ]
        if not matched:
            raise SelectionError(
                f"lora_target_parameters: {target!r} matches no parameter of this model (PEFT matches a "
                f"full name or a dotted suffix, e.g. mlp.experts.gate_up_proj); fix or remove it."
            )
        other = [name for name, ndim in matched if ndim != 3]
        if other:
            raise SelectionError(
                f"lora_target_parameters: {target!r} matches {other[0]}, which is not a 3-D expert "
                f"parameter; ILA ranks linear modules and mixture-of-experts expert parameters only. "
                f"Target its module with lora_target_modules instead, or remove it."
            )


def nothing_targeted_message(model: torch.nn.Module, cfg: Any) -> str:
    """Why no unit is a candidate: the target entries that matched nothing,
    and the names this model's linear modules do have."""
    from axolotl.loaders.adapter import find_all_linear_names

    units = model_units(model)
    leaves = sorted({unit.name.rpartition(".")[2] for unit in units if unit.experts is None})
    targets = cfg.lora_target_modules or []
    reasons = []
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, unit.name) for unit in units):
            reasons.append(f"the lora_target_modules regex {targets!r} matches no linear module")
    else:
        unmatched = [t for t in targets if not any(u.name == t or u.name.endswith(f".{t}") for u in units)]
        if unmatched:
            reasons.append(f"lora_target_modules entries {', '.join(unmatched)} match no linear module")
    if cfg.lora_target_linear and not find_all_linear_names(model):
        reasons.append(
            "lora_target_linear: true adapts nn.Linear modules but the output head, and this model has "
            "none (axolotl does not count transformers' Conv1D as linear; PEFT adapts it when named)"
        )
    if not reasons:
        reasons.append(
            "every match is excluded by lora_exclude_modules or lora_modules_to_save, or lies outside "
            "peft_layers_to_transform"
        )
    return (
        f"no linear module of this model is targeted by LoRA, so ILA has nothing to select: {'; '.join(reasons)}. "
        f"This model's linear modules are named {', '.join(leaves) or '(none)'}; list those you want in "
        f"lora_target_modules."
    )


def exclude_value(existing: list[str] | str | None, dropped: tuple[str, ...]) -> list[str] | str:
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


def target_parameters_value(cfg: Any, kept_parameters: list[str]) -> list[str] | None:
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
