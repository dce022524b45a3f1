"""The ``ila_`` config keys, validated where axolotl validates its own config.

axolotl merges this model into its config schema (``get_input_args``), so every
check here runs at config load, before any dataset or weight is touched.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from axolotl_ila.preference import unsupported_message
from axolotl_ila.ranking.hub import is_hub_path, parse_hub_path
from axolotl_ila.runtime.engines import continuation_refusal, engine_refusal
from axolotl_ila.selection import FUSED_GROUPS, RANKED_STRATEGIES, STRATEGIES

SUPPORTED_ADAPTERS = (None, "lora", "qlora")


def _open_unit(key: str, value: float | None) -> float | None:
    if value is not None and not 0.0 < value < 1.0:
        raise ValueError(f"{key} must be between 0 and 1 (exclusive), got {value}; e.g. {key}: 0.25")
    return value


class ILAArgs(BaseModel):
    """Input args for ILA (learned layer importance)."""

    ila_ranking: str | None = Field(
        default=None,
        json_schema_extra={
            "description": "Path of the ranking JSON: loaded if present and valid, else written by the search. Or a "
            "ranking on the Hugging Face Hub, hf://OWNER/REPO/PATH.json or hf://OWNER/REPO@REVISION/PATH.json "
            "(fetched into the Hugging Face cache; never searched for)."
        },
    )
    ila_search: Literal["auto", "always", "never"] = Field(
        default="auto",
        json_schema_extra={"description": "auto: search only when no ranking is at ila_ranking; always: search and refresh it; never: a valid ranking must exist."},
    )
    ila_drop_fraction: float | None = Field(
        default=None,
        json_schema_extra={"description": "Drop the adapters of this fraction of least important modules (default 0.25)."},
    )
    ila_keep_fraction: float | None = Field(
        default=None,
        json_schema_extra={"description": "Keep adapters only on this fraction of most important modules (efficiency mode, 0.1-0.3)."},
    )
    ila_strategy: str = Field(
        default="ila",
        json_schema_extra={"description": f"Importance order: {', '.join(STRATEGIES)}."},
    )
    ila_seed: int = Field(default=42, json_schema_extra={"description": "Seed of the `random` strategy."})
    ila_fused_groups: bool = Field(
        default=False,
        json_schema_extra={
            "description": "Keep or drop each block's q/k/v and gate/up/down together, so axolotl's fused "
            "LoRA kernels (lora_qkv_kernel, lora_mlp_kernel) still apply to every block that keeps them."
        },
    )

    # Not an `ila_` key: axolotl reads it (loaders/adapter.py) but its schema lacks
    # it, so without this declaration validation would drop the user's excludes.
    lora_exclude_modules: list[str] | str | None = Field(
        default=None,
        json_schema_extra={
            "description": "Modules LoRA never adapts (PEFT exclude_modules: names or dotted suffixes, or one "
            "regex); they are not ILA candidates either."
        },
    )

    # Search, stage 1 (warm-up): LoRA on every targeted module, for a fraction of the run.
    ila_warmup_fraction: float = Field(
        default=0.75,
        json_schema_extra={
            "description": "Length of the warm-up as a fraction of the planned training steps (with "
            "ila_warmup_early_stop: its cap). Default 0.75: on the planted-task suite it met both regret targets "
            "where the paper's 0.5 and 0.25 did not (docs/planted.md). 0.5 and 0.25 are the paper's recipe: shorter, "
            "cheaper searches."
        },
    )
    ila_warmup_max_steps: int | None = Field(
        default=None,
        json_schema_extra={"description": "Absolute length of the warm-up in optimizer steps (overrides ila_warmup_fraction)."},
    )
    ila_warmup_early_stop: bool = Field(
        default=False,
        json_schema_extra={
            "description": "true: the warm-up stops before its length once the probed ranking has settled and the "
            "loss is no longer clearly falling (cheaper where it fires). Default false: the warm-up runs its whole "
            "length (on the planted-task suite the early stop fired on 2 of 20 tasks and cost one of them 0.099 of "
            "held-out loss, docs/planted.md)."
        },
    )
    ila_warmup_min_steps: int = Field(
        default=10,
        json_schema_extra={"description": "With ila_warmup_early_stop: never stop the warm-up before this many steps."},
    )
    ila_stability_window: int = Field(
        default=10,
        json_schema_extra={
            "description": "Warm-up steps between two probes of the ranking with ila_warmup_early_stop (it stops on "
            "them). Without it the probes only feed the certainty record: at most 8 over the warm-up (and one at its "
            "end), never closer than this."
        },
    )
    ila_settle_agreement: float = Field(
        default=0.9,
        json_schema_extra={
            "description": "A stage stops once its order of modules agrees with the order at half its steps "
            "this much (rank correlation and top-75% Jaccard), twice in a row. In (0, 1); higher waits longer."
        },
    )
    ila_continue: bool | None = Field(
        default=None,
        json_schema_extra={
            "description": "true: the training continues from the search's warm-up (one run); false: it starts "
            "from fresh adapters after the search (the paper's two runs). Default: true for LoRA/QLoRA "
            "on one process, DDP, FSDP2 with fsdp_config.state_dict_type: SHARDED_STATE_DICT and DeepSpeed "
            "ZeRO-2/3 (LoRA), false otherwise (full fine-tuning, lora_target_parameters, FSDP2 with "
            "FULL_STATE_DICT, its default, a DeepSpeed config with its own optimizer or scheduler, "
            "lora_modules_to_save under DeepSpeed)."
        },
    )
    ila_search_learning_rate: float | None = Field(
        default=None,
        json_schema_extra={"description": "Warm-up learning rate; default `learning_rate` for LoRA/QLoRA, 2e-4 for full fine-tuning."},
    )
    ila_search_lora_r: int | None = Field(
        default=None,
        json_schema_extra={"description": "LoRA rank of the search; default `lora_r`, or 16 for full fine-tuning."},
    )

    # Search, stage 2 (gates): one sigmoid gate per module, everything else frozen.
    ila_gate_steps: int = Field(
        default=128,
        json_schema_extra={"description": "Cap of gate training in optimizer steps (paper: 128); it stops earlier once the order of the scores settles."},
    )
    ila_gate_min_steps: int = Field(
        default=64,
        json_schema_extra={
            "description": "Gate training never stops as settled before this many steps (default 64: on the "
            "planted-task suite the order after 16-48 gate steps still chose worse modules, docs/planted.md)."
        },
    )
    ila_gate_train_lora: bool = Field(
        default=False,
        json_schema_extra={
            "description": "The LoRA matrices keep learning (AdamW at the search's learning rate) while the gates "
            "compete, instead of staying frozen (the paper's stage 2)."
        },
    )
    ila_relearn_steps: int | None = Field(
        default=None,
        json_schema_extra={
            "description": "Steps of the re-learning check after the warm-up: the gates run once more with the LoRA "
            "matrices learning beside them, and a module they push out of the open share (ila_gate_budget) is "
            "ranked after every module they keep; its work, other modules' LoRA can learn. Default 32 (on the "
            "planted-task suite 16 was too few, docs/planted.md); 0 turns the check off (the paper's ranking: "
            "the gates alone), as it is by default under DeepSpeed, where LoRA cannot learn beside the gates."
        },
    )
    ila_gate_lr: float = Field(default=0.05, json_schema_extra={"description": "Step size of the gate scores."})
    ila_gate_budget: float = Field(
        default=0.5,
        json_schema_extra={"description": "Mean gate value allowed (the open-gate budget H/n); lower is a stronger budget."},
    )

    @field_validator("ila_drop_fraction", "ila_keep_fraction", "ila_warmup_fraction", "ila_gate_budget", "ila_settle_agreement")
    @classmethod
    def _fraction_in_open_unit(cls, value: float | None, info) -> float | None:
        return _open_unit(info.field_name, value)

    @field_validator("ila_ranking")
    @classmethod
    def _hub_path_form(cls, value: str | None) -> str | None:
        if is_hub_path(value):
            parse_hub_path(value)  # HubPathError (a ValueError) names the accepted forms
        return value

    @field_validator("ila_strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(f"ila_strategy: unknown strategy {value!r}; choose one of {', '.join(STRATEGIES)}")
        return value

    @field_validator("ila_gate_steps", "ila_stability_window", "ila_warmup_max_steps", "ila_search_lora_r")
    @classmethod
    def _positive(cls, value: int | None, info) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"{info.field_name} must be a positive integer, got {value}")
        return value

    @field_validator("ila_warmup_min_steps", "ila_gate_min_steps", "ila_relearn_steps")
    @classmethod
    def _non_negative(cls, value: int | None, info) -> int | None:
        if value is not None and value < 0:
            raise ValueError(f"{info.field_name} must be >= 0, got {value}")
        return value

    @field_validator("ila_gate_lr", "ila_search_learning_rate")
    @classmethod
    def _positive_float(cls, value: float | None, info) -> float | None:
        if value is not None and not value > 0:
            raise ValueError(f"{info.field_name} must be > 0, got {value}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _check_combination(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        check_known_keys(data, ILAArgs.model_fields)
        check_combination(data)
        return data


def check_known_keys(data: dict[str, Any], known: Any) -> None:
    """Refuse an ``ila_`` key the plugin does not declare: axolotl would drop it
    silently and the run would train with the default (e.g. ``ila_dropfraction``)."""
    declared = [name for name in known if name.startswith("ila_")]
    for key in data:
        if key in REPLACED_KEYS:
            raise ValueError(f"{key} is no longer a key: {REPLACED_KEYS[key]}. Remove it from the config.")
        if isinstance(key, str) and key.startswith("ila_") and key not in known:
            near = difflib.get_close_matches(key, declared, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]}?" if near else f"known keys: {', '.join(sorted(declared))}"
            raise ValueError(f"unknown config key {key} for axolotl_ila.ILAPlugin; {hint}")


def check_combination(data: dict[str, Any]) -> None:
    """Checks that need more than one key, on the raw config dict."""
    if data.get("ila_drop_fraction") is not None and data.get("ila_keep_fraction") is not None:
        raise ValueError(
            "set either ila_drop_fraction (drop the least important) or ila_keep_fraction "
            "(keep only the most important), not both"
        )
    rl = data.get("rl")
    refusal = unsupported_message(str(getattr(rl, "value", rl))) if rl else None
    if refusal:
        raise ValueError(refusal)
    adapter = data.get("adapter") or None
    if adapter not in SUPPORTED_ADAPTERS:
        raise ValueError(
            f"axolotl_ila.ILAPlugin supports adapter: lora, qlora, or no adapter (full "
            f"fine-tuning), not adapter: {adapter}; remove the plugin or change `adapter`"
        )
    strategy = data.get("ila_strategy") or "ila"
    if strategy in RANKED_STRATEGIES and not data.get("ila_ranking"):
        raise ValueError(
            f"ila_strategy: {strategy} needs a ranking file: set ila_ranking (e.g. "
            f"ila_ranking: rankings/my-model.json); it is searched and written if absent"
        )
    if data.get("ila_search") == "never" and not data.get("ila_ranking"):
        raise ValueError("ila_search: never needs ila_ranking to point at an existing ranking file")
    if data.get("ila_search") == "always" and is_hub_path(data.get("ila_ranking")):
        raise ValueError(
            f"ila_search: always searches and writes ila_ranking, but {data['ila_ranking']} is on the Hugging "
            f"Face Hub, which a search cannot write. Search into a local file (ila_ranking: rankings/NAME.json), "
            f"upload it with `hf upload OWNER/REPO rankings/NAME.json rankings/NAME.json`, and use the hf:// "
            f"path with ila_search: auto or never."
        )
    refusal = engine_refusal(data)
    if refusal:
        raise ValueError(refusal)
    check_continuation(data, adapter)
    spectrum = [p for p in data.get("plugins") or [] if _is_spectrum(p)]
    if spectrum:
        raise ValueError(
            f"{spectrum[0]} and axolotl_ila.ILAPlugin both decide which layers train; "
            f"remove one of them from `plugins:` (ILA's ila_strategy offers other selections)"
        )
    if adapter is None and data.get("unfrozen_parameters"):
        raise ValueError(
            "unfrozen_parameters and axolotl_ila.ILAPlugin both decide what full fine-tuning "
            "trains; remove one of them"
        )


REPLACED_KEYS = {
    "ila_stability_tolerance": "the warm-up now stops when the ranking settles, not the loss; "
    "use ila_settle_agreement (default 0.9) to tune how settled",
}


def output_dir(cfg: Any) -> str:
    """The run's ``output_dir``, with axolotl's default."""
    return cfg.output_dir or "./model-out"


def continues_by_default(config: Any) -> bool:
    """``ila_continue``'s default (raw config dict or axolotl's cfg): true for
    LoRA/QLoRA, false for full fine-tuning (the warm-up's LoRA is not the
    training's), for LoRA on expert parameters (``lora_target_parameters``,
    whose handover is not built yet) and where the engine cannot resume from
    the warm-up (``engines.continuation_refusal``: FSDP2 with FULL_STATE_DICT,
    a DeepSpeed config with its own optimizer or scheduler)."""
    return (
        bool(config.get("adapter"))
        and not continuation_refusal(config)
        and not config.get("lora_target_parameters")
    )


def check_continuation(data: dict[str, Any], adapter: str | None) -> None:
    """Continuing from the warm-up needs the warm-up's LoRA to be the training's."""
    wanted = data.get("ila_continue")
    engine_reason = continuation_refusal(data)
    if wanted and adapter is None:
        raise ValueError(
            "ila_continue: true needs adapter: lora or qlora; full fine-tuning cannot continue from the "
            "search's LoRA warm-up. Remove ila_continue (full fine-tuning trains afresh after the search)."
        )
    if wanted and data.get("lora_target_parameters"):
        raise ValueError(
            "ila_continue: true is not supported with lora_target_parameters (LoRA on expert parameters) "
            "yet; set ila_continue: false, or remove it (the default then trains afresh after the search)."
        )
    if wanted and engine_reason:
        raise ValueError(
            f"ila_continue: true cannot work here: {engine_reason}; or set ila_continue: false, or remove it "
            f"(the default then trains afresh after the search)."
        )
    if wanted is False or not continues_by_default(data):
        return
    for key, twin in (("ila_search_learning_rate", "learning_rate"), ("ila_search_lora_r", "lora_r")):
        if data.get(key) is not None and data.get(key) != data.get(twin):
            raise ValueError(
                f"{key} differs from {twin}, but the training continues from the search's warm-up "
                f"(ila_continue, the default for LoRA/QLoRA), so both must be the same. Remove {key}, or set "
                f"ila_continue: false for a separate warm-up (the paper's two runs)."
            )


def _is_spectrum(plugin: Any) -> bool:
    """axolotl's Spectrum plugin, named as axolotl's loader takes a plugin:
    ``axolotl.integrations.spectrum.SpectrumPlugin``, or (axolotl 0.21+, the
    entry-point form) ``axolotl.integrations.spectrum:SpectrumPlugin``.

    Refused with LoRA too: there its patterns match no PEFT name and nothing trains.
    """
    return isinstance(plugin, str) and re.split(r"[.:]", plugin)[-1] == "SpectrumPlugin"


def fused_groups(cfg: Any) -> tuple[str, ...]:
    """The fused groups kept or dropped whole: all of them with ``ila_fused_groups: true``."""
    return tuple(FUSED_GROUPS) if cfg.ila_fused_groups else ()


def selection_kwargs(cfg: Any) -> dict[str, Any]:
    return {
        "drop_fraction": cfg.ila_drop_fraction,
        "keep_fraction": cfg.ila_keep_fraction,
        "groups": fused_groups(cfg),
    }
