"""Preference training (axolotl's ``rl:``): where the selection lives, and its reference model.

Who puts the adapters on the model differs by method in axolotl 0.19:

- ``dpo``, ``ipo``, ``kto``: axolotl's loader builds the model *without* adapters
  and returns only the LoRA config (``loaders/model.py``, ``_load_adapters``,
  ``config_only=True``); TRL's trainer wraps the model with it. The
  ``exclude_modules`` ILA sets in ``post_model_build`` are in that config, so the
  dropped modules get no adapter; the reference is the policy with its adapters
  disabled, i.e. the untouched base.
- ``orpo``, ``simpo``: axolotl's loader puts the adapters on the model, as for
  SFT; these losses have no reference model.
- Full fine-tuning, or LoRA with ``rl_adapter_ref_model: true``: axolotl loads a
  separate reference model through the same loader and the same plugin hooks
  (``setup_reference_model``); DPO and IPO train against it, KTO builds its own
  from ``base_model``.

So with ``rl:`` nothing is applied or checked when a model loads (a hook there
cannot tell the policy from the reference). Once the trainer exists,
``trainer.model`` is the policy the optimizer will train: its adapters are
verified (or, for full fine-tuning, its dropped weights frozen) there, and
``trainer.ref_model`` is checked to carry no adapter and nothing ILA froze.

The online methods (``grpo``, ``gdpo``, ``ebft``) generate completions during
training (a vLLM server, or the model's own sampling with reward functions);
ILA does not support them.
"""

from __future__ import annotations

from typing import Any

from axolotl_ila.selection import Selection

# The preference methods ILA trains (cached ranking) and searches with.
PREFERENCE_METHODS = ("dpo", "ipo", "kto", "orpo", "simpo")
# Methods whose trainer wraps the model with the LoRA config itself.
TRAINER_WRAPS = ("dpo", "ipo", "kto")
# Methods with a reference model (the others' losses have none).
HAS_REFERENCE = ("dpo", "ipo", "kto")

ONLINE_METHODS = ("grpo", "gdpo", "ebft")


def method(cfg: Any) -> str | None:
    """``cfg.rl`` as a plain string (axolotl stores an ``RLType`` enum), or None for SFT."""
    rl = cfg.get("rl") if hasattr(cfg, "get") else getattr(cfg, "rl", None)
    if not rl:
        return None
    return str(getattr(rl, "value", rl))


def unsupported_message(rl: str) -> str | None:
    """Why ILA refuses ``rl: <rl>``, and what to do instead; None when it is supported."""
    if rl in PREFERENCE_METHODS:
        return None
    if rl in ONLINE_METHODS:
        return (
            f"rl: {rl} generates completions while it trains (online RL), which axolotl_ila.ILAPlugin "
            f"does not support: neither a search on it nor a run with a cached ranking is tested. Train "
            f"with ILA on an offline preference method ({', '.join(PREFERENCE_METHODS)}) or SFT, or remove "
            f"the plugin for this run."
        )
    return f"rl: {rl} is not a method axolotl_ila.ILAPlugin knows; it supports SFT and rl: {', '.join(PREFERENCE_METHODS)}."


def loss_identity(cfg: Any, trainer: Any) -> dict[str, Any]:
    """What loss a search learned its gates on, as the ranking records it:
    ``{"method": "sft"}``, or the preference method with its coefficients as
    the trainer holds them (beta, loss_type, ...)."""
    rl = method(cfg)
    if rl is None:
        return {"method": "sft"}
    out: dict[str, Any] = {"method": rl}
    args = trainer.args
    for key in ("beta", "loss_type", "label_smoothing", "simpo_gamma", "cpo_alpha", "desirable_weight", "undesirable_weight"):
        if hasattr(args, key):
            value = getattr(args, key)
            if isinstance(value, (list, tuple)):
                value = [str(getattr(v, "value", v)) for v in value]
            elif value is not None and not isinstance(value, (int, float, bool, str)):
                value = str(getattr(value, "value", value))
            out[key] = value
    return out


def reference_of(trainer: Any) -> Any:
    """The trainer's separate reference model, unwrapped; None when it has none."""
    ref = getattr(trainer, "ref_model", None)
    if ref is None:
        return None
    accelerator = getattr(trainer, "accelerator", None)
    return accelerator.unwrap_model(ref) if accelerator is not None else ref


def verify_reference(trainer: Any, selection: Selection, rl: str) -> str:
    """The reference the preference loss compares against is the untouched base:
    a separate reference model carries no LoRA layer, shares no weight with the
    policy, and has none of the selection's candidates frozen apart from the
    others (ILA freezes the policy only). Returns what the reference is, for the log."""
    from axolotl_ila.application import ApplicationError, adapted_modules, trainable_units

    ref = reference_of(trainer)
    if ref is None:
        if rl not in HAS_REFERENCE:
            return f"none ({rl} has no reference model)"
        if adapted_modules(trainer.model):
            return "the policy with its adapters disabled (the base model)"
        return "none held (its log-probabilities are precomputed)"
    adapted = sorted(adapted_modules(ref))
    if adapted:
        raise ApplicationError(
            f"ILA: the preference trainer's reference model carries LoRA on {len(adapted)} modules "
            f"({', '.join(adapted[:4])}{'...' if len(adapted) > 4 else ''}); the reference must be the "
            f"untouched base model. Is lora_model_dir loading an adapter into it? Training stops here."
        )
    policy_params = {id(p) for p in trainer.model.parameters()}
    shared = [name for name, p in ref.named_parameters() if id(p) in policy_params]
    if shared:
        raise ApplicationError(
            f"ILA: the preference trainer's reference model shares {len(shared)} weights with the policy "
            f"(e.g. {shared[0]}), so training the policy would move the reference. Training stops here."
        )
    # Left as loaded, every candidate of the reference trains or none does (TRL
    # may freeze it whole); some frozen and others not is a selection applied to it.
    candidates = set(selection.kept) | set(selection.dropped)
    trainable = trainable_units(ref, candidates)
    if trainable and trainable != candidates:
        frozen = sorted(candidates - trainable)
        raise ApplicationError(
            f"ILA: the preference trainer's reference model has {len(frozen)} of the selection's candidate "
            f"modules frozen and the others not (e.g. {frozen[0]}); the reference must be the untouched "
            f"base model. Training stops here."
        )
    return "a separate copy of the base model, without adapters"
