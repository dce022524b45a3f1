"""What a search runs with: the user's own config, changed only where a search
must differ, and the reasons a search cannot run at all.

Data, tokenization, packing, collator, precision, gradient accumulation and
distributed setup stay axolotl's, untouched. When the training continues from
the warm-up (``ila_continue``), the learning-rate schedule is the training run's
own too, so that the warm-up is literally its first steps.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from axolotl_ila.args import continues_by_default, output_dir
from axolotl_ila.candidates import user_excludes

IN_SEARCH_KEY = "ila_in_search"
FULL_FT_SEARCH_LR = 2e-4
FULL_FT_SEARCH_RANK = 16


class SearchError(RuntimeError):
    """The search cannot run with this config; says what to change."""


def check_search_config(cfg: Any) -> None:
    """Reasons a search cannot run, found before any data or weights load."""
    from axolotl_ila.preference import method, unsupported_message

    rl = method(cfg)
    refusal = unsupported_message(rl) if rl else None
    if refusal:
        raise SearchError(refusal)
    if cfg.peft_use_dora:
        raise SearchError(
            "the ILA gates scale the LoRA update, which DoRA reparametrizes; set "
            "peft_use_dora: false for the search (a ranking made with LoRA serves DoRA training)."
        )
    if cfg.lora_model_dir:
        raise SearchError(
            "lora_model_dir loads an existing adapter, but a search needs fresh adapters on every "
            "module; run `axolotl-ila search` with a config without lora_model_dir first."
        )


def continues_training(cfg: Any) -> bool:
    """Does the training run continue from the warm-up (one run), or start
    afresh after the search (the paper's two runs)? ``ila_continue``, or its
    default (``args.continues_by_default``); an explicit ``ila_continue: true``
    where the default is false is refused at config load."""
    if cfg.ila_continue is None:
        return continues_by_default(cfg)
    return bool(cfg.ila_continue)


def planned_steps(cfg: Any, dataset_meta: Any) -> int:
    total = cfg.max_steps or getattr(dataset_meta, "total_num_steps", None)
    if not total:
        raise SearchError("cannot tell the planned number of training steps; set max_steps.")
    return int(total)


def warmup_cap(cfg: Any, total_steps: int) -> int:
    if cfg.ila_warmup_max_steps:
        return min(int(cfg.ila_warmup_max_steps), total_steps)
    return min(max(int(cfg.ila_warmup_min_steps or 0), math.ceil(cfg.ila_warmup_fraction * total_steps), 1), total_steps)


def search_config(cfg: Any, cap: int, continuing: bool) -> Any:
    """The user's config, as the search's own run needs it.

    ``continuing``: keep the training's schedule (the warm-up is stopped at its
    step ``cap`` or earlier by a callback); otherwise the warm-up is a run of
    its own of ``cap`` steps, with its own schedule (the paper's stage 1).
    """
    scfg = copy.deepcopy(cfg)
    full_ft = not cfg.adapter
    scfg[IN_SEARCH_KEY] = True
    scfg.adapter = cfg.adapter or "lora"
    scfg.lora_r = cfg.ila_search_lora_r or cfg.lora_r or FULL_FT_SEARCH_RANK
    scfg.lora_alpha = (cfg.lora_alpha if not full_ft else None) or 2 * scfg.lora_r
    scfg.lora_dropout = cfg.lora_dropout or 0.0
    if full_ft and not cfg.lora_target_modules:
        scfg.lora_target_linear = True
    scfg.learning_rate = cfg.ila_search_learning_rate or (FULL_FT_SEARCH_LR if full_ft else cfg.learning_rate)
    # The gates hook each LoRA module's forward; the fused kernels bypass it.
    scfg.lora_mlp_kernel = scfg.lora_qkv_kernel = scfg.lora_o_kernel = False
    if not continuing:
        scfg.max_steps = cap
        scfg.warmup_steps = min(int(cfg.warmup_steps or 0), cap // 10)
        scfg.warmup_ratio = None
    scfg.logging_steps = 1
    scfg.output_dir = str(Path(output_dir(cfg)) / ".ila_search")
    scfg.save_strategy = "no"
    scfg.save_steps = scfg.saves_per_epoch = None
    scfg.eval_strategy = "no"
    scfg.eval_steps = scfg.evals_per_epoch = None
    scfg.do_bench_eval = False
    scfg.load_best_model_at_end = False
    scfg.early_stopping_patience = None
    scfg.resume_from_checkpoint = None
    scfg.auto_resume_from_checkpoints = False
    scfg.hub_model_id = None
    scfg.use_wandb = scfg.use_mlflow = scfg.use_comet = scfg.use_tensorboard = False
    scfg.unfrozen_parameters = None
    scfg.lora_exclude_modules = user_excludes(cfg)
    # Preference losses: the search's reference is its own LoRA model with the
    # adapters disabled, i.e. the base, as a separate reference model would be.
    scfg.rl_adapter_ref_model = False
    return scfg
