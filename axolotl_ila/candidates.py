"""Which units of the model are candidates for a selection: those the user's own
LoRA config would adapt (``lora_target_modules`` / ``lora_target_linear`` for
linear modules, ``lora_target_parameters`` for expert parameters), read off the
model's meta-device skeleton before any weights or data are loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from axolotl_ila.architecture import ModelUnit, fingerprint, model_units
from axolotl_ila.selection import SelectionError


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


# The LoRA keys ILA overwrites on ``cfg`` once the model is built (``post_model_build``),
# and where the user's own value is kept before that, so that it is read the same
# way before and after.
USERS_OWN_KEYS = {
    "lora_exclude_modules": "ila_user_exclude_modules",
    "lora_target_parameters": "ila_user_target_parameters",
}


def keep_users_own(cfg: Any) -> None:
    """Keep the user's own values of ``USERS_OWN_KEYS`` before ILA overwrites them
    (once: a second call keeps the first, the user's)."""
    for key, kept in USERS_OWN_KEYS.items():
        if kept not in cfg:
            cfg[kept] = cfg.get(key) or None


def _users_own(cfg: Any, key: str) -> Any:
    kept = USERS_OWN_KEYS[key]
    return cfg[kept] if kept in cfg else cfg.get(key) or None


def user_excludes(cfg: Any) -> list[str] | str | None:
    """The user's own ``lora_exclude_modules``, before ILA adds to it."""
    return _users_own(cfg, "lora_exclude_modules")


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
    value = _users_own(cfg, "lora_target_parameters")
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def parameter_matches(name: str, targets: list[str]) -> bool:
    """PEFT's rule for ``target_parameters``: the full name, or a dotted suffix."""
    return any(name == target or name.endswith(f".{target}") for target in targets)


def target_candidates(model: torch.nn.Module, cfg: Any) -> list[ModelUnit]:
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


@dataclass
class ModelInfo:
    """What the plan needs to know about the model, read off its skeleton."""

    fingerprint: str
    candidates: list[str]  # model order
    model_section: dict[str, Any]  # the ranking file's "model" section
    expert_candidates: tuple[str, ...] = ()  # the candidates that are expert parameters


def describe_model(cfg: Any) -> ModelInfo:
    skeleton = skeleton_model(cfg)
    units = model_units(skeleton)
    targeted = target_candidates(skeleton, cfg)
    if not targeted:
        raise SelectionError(nothing_targeted_message(skeleton, cfg))
    candidates = [m.name for m in targeted]
    config = skeleton.config
    section = {
        "base_model": cfg.base_model,
        "model_type": getattr(config, "model_type", None),
        "architectures": getattr(config, "architectures", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_linear_modules": sum(1 for m in units if m.experts is None),
        "num_expert_parameters": sum(1 for m in units if m.experts is not None),
        "fingerprint": fingerprint(units),
    }
    experts = tuple(m.name for m in targeted if m.experts is not None)
    return ModelInfo(section["fingerprint"], candidates, section, expert_candidates=experts)
