"""The ILA search: a LoRA warm-up, then one learned gate per module.

Read top to bottom, this is the story of a search:

1. ``search_config``: the user's own config, changed only where a search must
   differ (LoRA on every candidate module, a step cap, no checkpoints, no
   trackers). Data, tokenization, packing, collator, precision, gradient
   accumulation and distributed setup are axolotl's, untouched.
2. Stage 1 (warm-up): axolotl builds the model and trainer and trains until the
   loss is stable (``StabilityMonitor``) or the cap is reached.
3. ``update_norms``: how far each module's LoRA update moved (ALLO-style scorer).
4. Stage 2 (gates): base and LoRA frozen; module i's LoRA output is scaled by
   sigmoid(s_i); the scores s are learned on the training loss for a fixed
   number of steps under a budget on the mean gate (see ``GateSearch``).
5. The scores become a ``Ranking`` that records how it was made.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from axolotl_ila.application import lora_layers
from axolotl_ila.distributed import all_reduce_mean_, is_main_process
from axolotl_ila.lora_update import install_gate, update_norm
from axolotl_ila.plan import ModelInfo
from axolotl_ila.ranking import Ranking

LOG = logging.getLogger("axolotl.ila")

IN_SEARCH_KEY = "ila_in_search"
FULL_FT_SEARCH_LR = 2e-4
FULL_FT_SEARCH_RANK = 16


class SearchError(RuntimeError):
    """The search cannot run with this config; says what to change."""


# --------------------------------------------------------------------------- config


def check_search_config(cfg: Any) -> None:
    """Reasons a search cannot run, found before any data or weights load."""
    if cfg.rl:
        raise SearchError(
            f"the ILA search runs on supervised data; rl: {cfg.rl} is not supported for the search. "
            f"Make the ranking with an SFT config of the same model (`axolotl-ila search`), then "
            f"point ila_ranking at it with ila_search: never."
        )
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


def planned_steps(cfg: Any, dataset_meta: Any) -> int:
    total = cfg.max_steps or getattr(dataset_meta, "total_num_steps", None)
    if not total:
        raise SearchError("cannot tell the planned number of training steps; set max_steps.")
    return int(total)


def warmup_cap(cfg: Any, total_steps: int) -> int:
    if cfg.ila_warmup_max_steps:
        return int(cfg.ila_warmup_max_steps)
    return max(int(cfg.ila_warmup_min_steps or 0), math.ceil(cfg.ila_warmup_fraction * total_steps), 1)


def search_config(cfg: Any, max_steps: int) -> Any:
    """The user's config, as the search's own run needs it."""
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
    scfg.max_steps = max_steps
    scfg.warmup_steps = min(int(cfg.warmup_steps or 0), max_steps // 10)
    scfg.warmup_ratio = None
    scfg.logging_steps = 1
    scfg.output_dir = str(Path(cfg.output_dir or "./model-out") / ".ila_search")
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
    scfg.lora_exclude_modules = cfg.get("ila_user_exclude_modules", cfg.get("lora_exclude_modules"))
    return scfg


# --------------------------------------------------------------------------- stage 1


@dataclass
class StabilityMonitor:
    """Is the loss still moving? Compares the mean loss of the last ``window``
    steps with the mean of the ``window`` before; stable when the relative change
    is below ``tolerance`` (after ``min_steps``)."""

    window: int
    tolerance: float
    min_steps: int
    losses: list[float] = field(default_factory=list)

    def update(self, loss: float) -> None:
        self.losses.append(float(loss))

    @property
    def relative_change(self) -> float | None:
        if len(self.losses) < 2 * self.window:
            return None
        recent = sum(self.losses[-self.window :]) / self.window
        before = sum(self.losses[-2 * self.window : -self.window]) / self.window
        return abs(recent - before) / max(abs(before), 1e-8)

    @property
    def stable(self) -> bool:
        change = self.relative_change
        return len(self.losses) >= self.min_steps and change is not None and change < self.tolerance


def _stability_callback(monitor: StabilityMonitor, cap: int):
    from transformers import TrainerCallback

    class StabilityCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            monitor.update(logs["loss"])
            step = len(monitor.losses)
            change = monitor.relative_change
            if step % monitor.window == 0 and is_main_process():
                LOG.info(
                    "ILA warm-up step %d/%d loss %.4f window change %s",
                    step,
                    cap,
                    monitor.losses[-1],
                    "n/a" if change is None else f"{change:.2%}",
                )
            # The logged loss is gathered across ranks, so every rank stops together.
            if monitor.stable:
                control.should_training_stop = True

    return StabilityCallback()


def lora_modules(model: torch.nn.Module) -> dict[str, Any]:
    """Base-model unit name -> PEFT LoRA layer, in model order."""
    return lora_layers(model)


def update_norms(layers: dict[str, Any], adapter: str = "default") -> dict[str, float]:
    """Frobenius norm of each unit's LoRA update ``scaling * B @ A``.

    B starts at zero, so this is how far the update moved during the warm-up.
    """
    return {name: update_norm(layer, adapter) for name, layer in layers.items()}


# --------------------------------------------------------------------------- stage 2


class GateSearch:
    """One score s_i per module; its LoRA update is multiplied by sigmoid(s_i).

    Budget: after every step, all scores shift by one common amount so that the
    mean gate stays at most ``budget`` (an exact, order-preserving projection onto
    {mean(sigmoid(s)) <= budget}, the paper's ||gamma|| < H with H = budget * n).
    Gates start at sigmoid(0) = 0.5. Without a budget every gate simply opens,
    since every warmed-up LoRA update lowers the loss; with one, opening a gate
    closes the others a little, so modules compete and the scores separate.

    The step is momentum SGD normalised by one running RMS over *all* gates:
    the step size does not depend on the loss scale, yet a gate whose gradient
    is twice as large moves twice as far (a per-gate Adam would move every gate
    at the same speed and erase exactly the differences we want to measure).
    """

    def __init__(self, layers: dict[str, Any], budget: float, lr: float, adapter: str = "default"):
        self.names = list(layers)
        first = next(iter(layers.values())).lora_B[adapter].weight
        self.scores = torch.zeros(len(self.names), device=first.device, dtype=torch.float32, requires_grad=True)
        self.budget = budget
        self.lr = lr
        self._momentum = torch.zeros_like(self.scores)
        self._sq = 0.0
        self._steps = 0
        self._hooks = [install_gate(layer, self._gate(i), adapter) for i, layer in enumerate(layers.values())]

    def _gate(self, index: int):
        return lambda: torch.sigmoid(self.scores[index])

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @torch.no_grad()
    def step(self, beta1: float = 0.9, beta2: float = 0.99, eps: float = 1e-12) -> None:
        grad = self.scores.grad
        all_reduce_mean_(grad)
        self._steps += 1
        self._momentum.mul_(beta1).add_(grad, alpha=1 - beta1)
        self._sq = beta2 * self._sq + (1 - beta2) * float(grad.pow(2).mean())
        m_hat = self._momentum / (1 - beta1**self._steps)
        rms = math.sqrt(self._sq / (1 - beta2**self._steps))
        self.scores.sub_(self.lr * m_hat / (rms + eps))
        self.scores.sub_(budget_shift(self.scores, self.budget))
        self.scores.grad = None

    def mean_gate(self) -> float:
        return float(torch.sigmoid(self.scores.detach()).mean())

    def result(self) -> dict[str, float]:
        return dict(zip(self.names, self.scores.detach().cpu().tolist()))


def budget_shift(scores: torch.Tensor, budget: float, iterations: int = 60) -> float:
    """Smallest common shift t >= 0 with mean(sigmoid(scores - t)) <= budget."""
    if float(torch.sigmoid(scores).mean()) <= budget:
        return 0.0
    logit = math.log(budget / (1 - budget))
    lo, hi = 0.0, float(scores.max()) - logit + 1.0  # mean at hi is below budget
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if float(torch.sigmoid(scores - mid).mean()) > budget:
            lo = mid
        else:
            hi = mid
    return hi


def _batches(dataloader):
    while True:
        yielded = False
        for batch in dataloader:
            yielded = True
            yield batch
        if not yielded:
            raise SearchError("the training dataloader is empty; check datasets and sequence_len.")


def run_gates(trainer: Any, layers: dict[str, Any], steps: int, lr: float, budget: float) -> tuple[dict[str, float], dict[str, Any]]:
    from tqdm.auto import tqdm

    model = trainer.model
    for param in model.parameters():
        param.requires_grad_(False)
    gates = GateSearch(layers, budget=budget, lr=lr)
    accumulation = int(trainer.args.gradient_accumulation_steps or 1)
    batches = _batches(trainer.get_train_dataloader())
    losses = []
    model.train()
    bar = tqdm(range(steps), desc="ILA gates", disable=not is_main_process())
    try:
        for step in bar:
            total = 0.0
            for _ in range(accumulation):
                batch = next(batches)
                with trainer.compute_loss_context_manager():
                    loss = trainer.compute_loss(model, batch)
                (loss / accumulation).backward()
                total += float(loss.detach()) / accumulation
            gates.step()
            losses.append(total)
            bar.set_postfix(loss=f"{total:.4f}", mean_gate=f"{gates.mean_gate():.3f}")
            if is_main_process() and (step + 1) % max(steps // 8, 1) == 0:
                LOG.info("ILA gates step %d/%d loss %.4f mean gate %.3f", step + 1, steps, total, gates.mean_gate())
    finally:
        gates.remove()
    record = {
        "steps": steps,
        "lr": lr,
        "budget": budget,
        "budget_mechanism": "mean gate <= budget by a common shift of all scores after each step",
        "init_score": 0.0,
        "gradient_accumulation_steps": accumulation,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_curve": _curve(losses),
        "mean_gate": gates.mean_gate(),
    }
    return gates.result(), record


def _curve(values: list[float], points: int = 20) -> list[float]:
    """A short summary of a loss curve: ``points`` evenly spaced samples."""
    if len(values) <= points:
        return [round(v, 5) for v in values]
    return [round(values[round(i * (len(values) - 1) / (points - 1))], 5) for i in range(points)]


# --------------------------------------------------------------------------- the story


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


def search_ranking(cfg: Any, dataset_meta: Any, info: ModelInfo) -> Ranking:
    """Run both stages on the run's own data and return the ranking.

    Callers run ``check_search_config(cfg)`` first, before loading the data.
    """
    from axolotl.train import setup_model_and_tokenizer
    from axolotl.utils.trainer import setup_trainer
    from transformers import set_seed

    total = planned_steps(cfg, dataset_meta)
    cap = warmup_cap(cfg, total)
    scfg = search_config(cfg, cap)
    LOG.info("ILA search: warm-up of at most %d steps (%d planned for training), then %d gate steps", cap, total, cfg.ila_gate_steps)

    # Seed before the adapters exist: LoRA's A matrices are drawn at model load,
    # before the trainer seeds anything, and a search must be reproducible.
    seed = cfg.seed if cfg.seed is not None else 42
    set_seed(seed)
    started = time.perf_counter()
    model, tokenizer, peft_config, processor = setup_model_and_tokenizer(scfg)
    layers = lora_modules(model)
    if set(layers) != set(info.candidates):
        raise SearchError(
            f"the search model has LoRA on {len(layers)} modules but {len(info.candidates)} were expected; "
            f"check lora_target_modules / lora_target_linear."
        )
    layers = {name: layers[name] for name in info.candidates}
    trainer = setup_trainer(
        cfg=scfg,
        train_dataset=dataset_meta.train_dataset,
        eval_dataset=None,
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        total_num_steps=cap,
        peft_config=peft_config,
    )
    monitor = StabilityMonitor(cfg.ila_stability_window, cfg.ila_stability_tolerance, cfg.ila_warmup_min_steps)
    trainer.add_callback(_stability_callback(monitor, cap))
    trainer.train()
    stage1_s = time.perf_counter() - started
    steps_done = len(monitor.losses)
    stage1 = {
        "steps": steps_done,
        "max_steps": cap,
        "planned_training_steps": total,
        "fraction_of_training": steps_done / total,
        "stop_reason": "stable" if monitor.stable else "cap",
        "stability": {
            "window": monitor.window,
            "tolerance": monitor.tolerance,
            "min_steps": monitor.min_steps,
            "final_relative_change": monitor.relative_change,
        },
        "learning_rate": scfg.learning_rate,
        "lora_r": scfg.lora_r,
        "lora_alpha": scfg.lora_alpha,
        "loss_first": monitor.losses[0] if monitor.losses else None,
        "loss_last": monitor.losses[-1] if monitor.losses else None,
        "loss_curve": _curve(monitor.losses),
        "wall_s": round(stage1_s, 3),
    }
    LOG.info("ILA warm-up stopped after %d steps (%s)", steps_done, stage1["stop_reason"])

    norms = update_norms(layers)
    set_seed(seed)
    started = time.perf_counter()
    scores, stage2 = run_gates(trainer, layers, cfg.ila_gate_steps, cfg.ila_gate_lr, cfg.ila_gate_budget)
    stage2["wall_s"] = round(time.perf_counter() - started, 3)

    search = {
        "method": "ila",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": _data_identity(cfg, dataset_meta),
        "seed": seed,
        "adapter": scfg.adapter,
        "stage1": stage1,
        "stage2": stage2,
        "world_size": int(trainer.args.world_size),
        "versions": _versions(),
    }
    ranking = Ranking.from_scores(
        scores, model=info.model_section, search=search, update_norms=norms, module_order=info.candidates
    )
    # Release the search model before the real one is built: the accelerator
    # keeps references to what it prepared.
    trainer.accelerator.free_memory()
    del trainer, model, layers
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    LOG.info("ILA search done\n%s", top_bottom_table(ranking))
    return ranking


def top_bottom_table(ranking: Ranking, n: int = 5) -> str:
    rows = [f"  {'rank':>4}  {'score':>9}  module"]
    count = len(ranking.modules)
    shown = list(range(min(n, count))) + [i for i in range(max(count - n, n), count)]
    previous = -1
    for i in shown:
        if i != previous + 1:
            rows.append("  ...")
        module = ranking.modules[i]
        rows.append(f"  {i + 1:>4}  {module.score:>9.4f}  {module.name}")
        previous = i
    return "\n".join(rows)
