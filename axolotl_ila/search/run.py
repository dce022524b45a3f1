"""The ILA search, read top to bottom as the story of a search.

1. ``search_config``: the user's own config, changed only where a search must
   differ (LoRA on every candidate module, no checkpoints, no trackers).
2. Stage 1 (``warmup``): axolotl builds the model and trainer and trains for
   the warm-up's length, probing the ranking as it goes (with
   ``ila_warmup_early_stop``, until the probed ranking has settled).
3. ``update_norms``: how far each module's LoRA update moved (ALLO-style scorer).
4. The warm-up's state is kept (``handoff.WarmState``) for the training to
   continue from, unless the config asks for the paper's two runs.
5. The re-learning check (``relearn``): the gates run for ``ila_relearn_steps``
   with LoRA learning beside them, from the warm-up's state (put back after);
   the modules they push out of the open share are the ones whose work other
   modules' LoRA can learn.
6. Stage 2 (``gates``): base and LoRA frozen; module i's LoRA output is scaled
   by sigmoid(s_i); the scores are learned until their order settles
   (never before ``ila_gate_min_steps``). The modules the check closed are
   ranked after the others, each group in its gate order.
   Every stage uses the trainer's own loss (``trainer.compute_loss``): the
   supervised loss, or with ``rl:`` the preference loss (DPO, IPO, KTO, ORPO,
   SimPO), whose reference is the search model with its adapters disabled.
7. The scores become a ``Ranking`` that records how it was made and why each
   stage stopped.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from axolotl_ila.candidates import ModelInfo
from axolotl_ila.handoff.state import WarmState
from axolotl_ila.preference import loss_identity, method
from axolotl_ila.ranking.file import Ranking
from axolotl_ila.report.text import relearn_line, top_bottom_table
from axolotl_ila.runtime.engines import relearn_steps
from axolotl_ila.search.certainty import certainty, certainty_warnings
from axolotl_ila.search.gates import OrderSettle, curve, run_gates
from axolotl_ila.search.relearn import demote, lora_restored, open_share
from axolotl_ila.search.settings import SearchError, planned_steps, search_config, warmup_cap
from axolotl_ila.search.warmup import FALLING_T_STAT, RankingProbe, lora_modules, loss_trend, probe_count, probe_interval, update_norms, warmup_callback

LOG = logging.getLogger("axolotl.ila")


@dataclass
class SearchResult:
    ranking: Ranking
    warm: WarmState | None  # the warm-up's state, when the training continues from it


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for package in ("axolotl-ila", "axolotl", "torch", "transformers", "peft", "accelerate"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _data_identity(cfg: Any, dataset_meta: Any) -> dict[str, Any]:
    datasets = []
    for ds in cfg.datasets or []:
        get = ds.get if isinstance(ds, dict) else lambda k, d=None, ds=ds: getattr(ds, k, d)
        datasets.append({k: get(k) for k in ("path", "type", "name", "split", "data_files") if get(k) is not None})
    train = getattr(dataset_meta, "train_dataset", None)
    return {
        "datasets": datasets,
        "train_rows": len(train) if train is not None else None,
        "train_fingerprint": getattr(train, "_fingerprint", None),
        "sequence_len": cfg.sequence_len,
        "sample_packing": bool(cfg.sample_packing),
        "micro_batch_size": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
    }


def search_ranking(cfg: Any, dataset_meta: Any, info: ModelInfo, keep_warm_state: bool = False) -> SearchResult:
    """Run both stages on the run's own data and return the ranking (and, with
    ``keep_warm_state``, the warm-up's state for the training to continue from).

    Callers run ``check_search_config(cfg)`` first, before loading the data.
    """
    from transformers import set_seed

    # 1. The search's own config.
    total = planned_steps(cfg, dataset_meta)
    cap = warmup_cap(cfg, total)
    scfg = search_config(cfg, cap, continuing=keep_warm_state)
    LOG.info(
        "ILA search: warm-up of %s%d steps (%d planned for training%s), "
        "then at most %d gate steps, on the %s loss",
        "at most " if cfg.ila_warmup_early_stop else "",
        cap,
        total,
        "; the training continues from it" if keep_warm_state else "",
        cfg.ila_gate_steps,
        method(cfg) or "supervised (SFT)",
    )
    LOG.info("ILA search: %s", cost_line(cfg, cap, len(info.candidates), keep_warm_state))
    # Seed before the adapters exist: LoRA's A matrices are drawn at model load,
    # before the trainer seeds anything, and a search must be reproducible.
    seed = cfg.seed if cfg.seed is not None else 42
    set_seed(seed)

    # 2. Stage 1: the warm-up.
    trainer, layers, stage1 = _warm_up(cfg, scfg, dataset_meta, info, total, cap, keep_warm_state)
    # 3. How far each module's LoRA update moved.
    norms = update_norms(layers)
    # 4. The warm-up's state, for the training to continue from.
    warm = WarmState.capture(trainer) if keep_warm_state else None
    # 5. The re-learning check.
    set_seed(seed)
    relearn_scores, relearn = _relearn_check(cfg, trainer, layers)
    # 6. Stage 2: the gates, and the check's closed modules after the others.
    set_seed(seed)
    scores, stage2 = _gate_search(cfg, trainer, layers)
    if relearn_scores is not None:
        kept = open_share(relearn_scores, cfg.ila_gate_budget)
        scores, shift = demote(scores, kept)
        relearn.update(closed=[n for n in info.candidates if n not in kept], shift=shift)
    # 7. The ranking, with how it was made.
    search = {
        "method": "ila",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": _data_identity(cfg, dataset_meta),
        "loss": loss_identity(cfg, trainer),
        "seed": seed,
        "adapter": scfg.adapter,
        "stage1": stage1,
        "stage2": stage2,
        "relearn": relearn,
        "world_size": int(trainer.args.world_size),
        "versions": _versions(),
    }
    search["certainty"] = certainty(search)
    ranking = Ranking.from_scores(
        scores, model=info.model_section, search=search, update_norms=norms, module_order=info.candidates
    )
    # Release the search model before the real one is built: the accelerator
    # keeps references to what it prepared.
    trainer.accelerator.free_memory()
    del trainer, layers
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    LOG.info("ILA re-learning check: %s", relearn_line(relearn))
    LOG.info("ILA search done\n%s", "\n".join(top_bottom_table(ranking)))
    for warning in certainty_warnings(search):
        LOG.warning("ILA: %s", warning)
    return SearchResult(ranking=ranking, warm=warm)


def cost_line(cfg: Any, cap: int, modules: int, continuing: bool) -> str:
    """What the search runs beside the training's own steps, counted in steps
    (said before it starts, so that a user can weigh it)."""
    every = probe_interval(int(cfg.ila_stability_window), cap, bool(cfg.ila_warmup_early_stop))
    relearn = relearn_steps(cfg)
    gates_min, gates_max = min(int(cfg.ila_gate_min_steps), int(cfg.ila_gate_steps)), int(cfg.ila_gate_steps)
    gates = f"{gates_max}" if gates_min == gates_max else f"{gates_min}-{gates_max}"
    warmup = (
        f"the warm-up's {cap} steps train LoRA on all {modules} modules, not only the kept ones, and the training continues from them"
        if continuing
        else f"the warm-up's {cap} steps come before the training, which starts afresh"
    )
    return (
        f"it adds {probe_count(every, cap)} probes, {relearn} re-learning steps and {gates} gate steps, each about "
        f"one training step; {warmup}"
    )


def _warm_up(
    cfg: Any, scfg: Any, dataset_meta: Any, info: ModelInfo, total: int, cap: int, keep_warm_state: bool
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Stage 1: axolotl builds the search model and trainer, which trains until
    the probed ranking settles (or ``cap``). Returns the trainer, the LoRA
    layers by module name (candidate order) and the stage's record."""
    from axolotl.train import setup_model_and_tokenizer
    from axolotl.utils.trainer import setup_trainer

    started = time.perf_counter()
    model, tokenizer, peft_config, processor = setup_model_and_tokenizer(scfg)
    trainer = setup_trainer(
        cfg=scfg,
        train_dataset=dataset_meta.train_dataset,
        eval_dataset=None,
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        total_num_steps=total if keep_warm_state else cap,
        model_ref=None,  # preference losses: the reference is this model with its adapters disabled
        peft_config=peft_config,
    )
    # The model the trainer trains: for rl: dpo/ipo/kto TRL has just put the
    # adapters on it (axolotl's loader returned only their config).
    layers = lora_modules(trainer.model)
    if set(layers) != set(info.candidates):
        raise SearchError(
            f"the search model has LoRA on {len(layers)} modules but {len(info.candidates)} were expected; "
            f"check lora_target_modules / lora_target_linear."
        )
    layers = {name: layers[name] for name in info.candidates}
    early_stop = bool(cfg.ila_warmup_early_stop)
    every = probe_interval(int(cfg.ila_stability_window), cap, early_stop)
    settle = OrderSettle(agreement=cfg.ila_settle_agreement, min_steps=min(int(cfg.ila_warmup_min_steps or 0), cap))
    losses: list[float] = []
    callback = warmup_callback(RankingProbe(trainer, layers), settle, every, cap, losses, early_stop)
    trainer.add_callback(callback)
    trainer.train()
    wall_s = time.perf_counter() - started
    stage1 = _warm_up_record(scfg, trainer, callback.stop_reason, early_stop, settle, every, losses, total, cap, keep_warm_state, wall_s)
    LOG.info("ILA warm-up stopped after %d steps (%s)", stage1["steps"], stage1["stop_reason"])
    return trainer, layers, stage1


def _warm_up_record(
    scfg: Any,
    trainer: Any,
    stop_reason: str,
    early_stop: bool,
    settle: OrderSettle,
    every: int,
    losses: list[float],
    total: int,
    cap: int,
    keep_warm_state: bool,
    wall_s: float,
) -> dict[str, Any]:
    """The ranking file's ``search.stage1``: how long the warm-up ran and why it stopped."""
    steps_done = int(trainer.state.global_step)
    return {
        "steps": steps_done,
        "max_steps": cap,
        "planned_training_steps": total,
        "fraction_of_training": steps_done / total,
        "stop_reason": stop_reason,
        "early_stop": early_stop,
        "settle": {
            "signal": "order of the gate gradient at the gates' start (one micro-batch, smoothed), "
            "compared with the order at half the steps; and the loss no longer clearly falling",
            "loss_trend": loss_trend(losses),
            "falling_t_stat": FALLING_T_STAT,
            "check_every": every,
            "agreement": settle.agreement,
            "min_steps": settle.min_steps,
            "last_check": settle.last,
        },
        "continued_by_training": keep_warm_state,
        "learning_rate": scfg.learning_rate,
        "lora_r": scfg.lora_r,
        "lora_alpha": scfg.lora_alpha,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_curve": curve(losses),
        "wall_s": round(wall_s, 3),
    }


def _gate_search(cfg: Any, trainer: Any, layers: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """Stage 2: the gate scores, and the stage's record."""
    started = time.perf_counter()
    scores, stage2 = run_gates(
        trainer,
        layers,
        cfg.ila_gate_steps,
        cfg.ila_gate_lr,
        cfg.ila_gate_budget,
        agreement=cfg.ila_settle_agreement,
        min_steps=cfg.ila_gate_min_steps,
        lora_lr=float(trainer.args.learning_rate) if cfg.ila_gate_train_lora else None,  # the warm-up's rate
    )
    stage2["wall_s"] = round(time.perf_counter() - started, 3)
    return scores, stage2


def _relearn_check(cfg: Any, trainer: Any, layers: dict[str, Any]) -> tuple[dict[str, float] | None, dict[str, Any]]:
    """The re-learning gates' scores (None when the check is off) and its record."""
    steps = relearn_steps(cfg)
    if steps == 0:
        why = "ila_relearn_steps: 0" if cfg.ila_relearn_steps == 0 else "off by default under DeepSpeed"
        return None, {"steps": 0, "why_not": why}  # logged with the ranking (relearn_line)
    started = time.perf_counter()
    with lora_restored(layers):
        scores, record = run_gates(
            trainer,
            layers,
            steps,
            cfg.ila_gate_lr,
            cfg.ila_gate_budget,
            agreement=cfg.ila_settle_agreement,
            min_steps=steps,  # a fixed length: it never stops as settled
            lora_lr=float(trainer.args.learning_rate),  # the warm-up's rate
            label="re-learning check",
        )
    record["wall_s"] = round(time.perf_counter() - started, 3)
    record["stop_reason"] = "fixed length"
    record["open_share"] = cfg.ila_gate_budget
    record["scores"] = {name: round(value, 5) for name, value in scores.items()}
    return scores, record
