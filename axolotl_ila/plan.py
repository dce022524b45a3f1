"""From a config to a selection: the decisions made before any model is built.

    config -> (skeleton of the model) -> ranking (loaded, or searched) -> selection

Everything that can be wrong with the user's input (a ranking for another model,
a fraction that leaves nothing, a file that must not be overwritten, a resumed
run whose adapters would change shape) is found here, from the model's meta-device
skeleton, before datasets or weights are loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from axolotl_ila.application import peft_exclude_modules
from axolotl_ila.args import fused_groups, output_dir, selection_kwargs
from axolotl_ila.candidates import ModelInfo, describe_model, user_excludes
from axolotl_ila.outputs import RANKING_COPY_NAME, write_record
from axolotl_ila.ranking.file import RankingError
from axolotl_ila.ranking_source import FoundRanking, find_or_search_ranking
from axolotl_ila.record import RECORD_FORMAT, is_resuming, recorded_selection
from axolotl_ila.runtime.distributed import on_main, same_on_all_ranks
from axolotl_ila.selection import FUSED_GROUPS, RANKED_STRATEGIES, Selection, importance_order, no_groups_note, select, split_groups

LOG = logging.getLogger("axolotl.ila")


@dataclass
class Plan:
    selection: Selection
    model: ModelInfo
    ranking_identity: dict[str, Any] | None  # path, digest and fingerprint of the ranking used (+ hub, copy)
    handoff_checkpoint: Path | None = None  # the warm-up's checkpoint the training continues from
    ranking_file: Path | None = None  # the ranking's bytes on this machine, copied into output_dir

    def record(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "version": 1,
            "model_fingerprint": self.model.fingerprint,
            "ranking": self.ranking_identity,
            **self.selection.to_json(),
        }


KERNEL_OF_GROUP = {"qkv": "lora_qkv_kernel", "mlp": "lora_mlp_kernel"}


def kernel_warnings(cfg: Any, selection: Selection) -> list[str]:
    """One line per fused LoRA kernel that is on but that the selection keeps
    from applying in some blocks (it splits their group), with the key to change."""
    if cfg.ila_fused_groups and not selection.groups:
        return [f"ILA: ila_fused_groups: true, but {no_groups_note(fused_groups(cfg))}."]
    if not cfg.adapter or selection.groups:
        return []
    messages = []
    for group, key in KERNEL_OF_GROUP.items():
        split = split_groups(selection, group) if cfg.get(key) else []
        if split:
            messages.append(
                f"ILA: {key} is on, but the selection keeps only some of {'/'.join(FUSED_GROUPS[group])} "
                f"in {len(split)} blocks (e.g. {split[0]}), which axolotl then runs unfused. Set "
                f"ila_fused_groups: true to keep or drop each group whole (the selection then follows "
                f"the ranking less closely; see docs/fused-kernels.md)."
            )
    return messages


def resolve_plan(
    cfg: Any,
    run_search: Callable[[Any, ModelInfo, bool], Any] | None = None,
    force_search: bool = False,
    training: bool = True,
) -> Plan:
    """Decide the selection for this run. ``run_search(cfg, info, keep_warm_state)``
    is called only when the config asks for a search (or ``force_search``) and
    returns a ``search.SearchResult``. ``training``: a training run follows, which
    continues from the warm-up when ``ila_continue`` says so (``plan.handoff_checkpoint``)."""
    info = describe_model(cfg)
    strategy = cfg.ila_strategy or "ila"
    # Fraction errors (nothing left, nothing dropped) before any expensive work;
    # the rule it returns is what a resumed run must still ask for.
    requested = select(info.candidates, info.candidates, strategy, **selection_kwargs(cfg))
    resuming = is_resuming(cfg) and not force_search
    # A resumed run never searches: its adapters already have a shape.
    found = find_or_search_ranking(cfg, info, strategy, run_search, force_search, training, may_search=not resuming)
    selection = None if strategy in RANKED_STRATEGIES and found is None else select_modules(cfg, info, strategy, found)
    if resuming:
        selection, identity = recorded_selection(cfg, info, requested, selection)
        return Plan(selection=selection, model=info, ranking_identity=identity)
    if found is None:
        return Plan(selection=selection, model=info, ranking_identity=None)
    identity = found.source.identity(found.ranking)
    if training:
        identity["copy"] = RANKING_COPY_NAME  # written with the record (write_record)
    if not same_on_all_ranks(identity["digest"]):
        raise RankingError(f"ranking file {found.source.spec} differs between processes; put it on a filesystem all ranks share.")
    plan = Plan(selection=selection, model=info, ranking_identity=identity, ranking_file=found.source.local_path)
    if found.warm is not None:
        plan.handoff_checkpoint = hand_over(cfg, plan, found.warm)
    return plan


def select_modules(cfg: Any, info: ModelInfo, strategy: str, found: FoundRanking | None) -> Selection:
    """The config's selection: the strategy's importance order, cut by the fraction."""
    if found is None:
        order = importance_order(info.candidates, strategy, seed=cfg.ila_seed if cfg.ila_seed is not None else 42)
    else:
        order = importance_order(info.candidates, strategy, ranking=found.ranking)
    return select(info.candidates, order, strategy, **selection_kwargs(cfg))


def hand_over(cfg: Any, plan: Plan, warm: Any) -> Path:
    """Write the warm-up's state of the kept modules as the training run's first
    checkpoint (main process), with the selection record beside it, so that a
    run killed from here on resumes with this selection; every rank then
    resumes from it."""
    from axolotl_ila.handoff.checkpoint import write_checkpoint, write_sharded_checkpoint
    from axolotl_ila.handoff.names import checkpoint_dir

    out = output_dir(cfg)
    selection = plan.selection
    args = (warm, list(selection.kept), list(selection.dropped), out)
    exclude = peft_exclude_modules(user_excludes(cfg), selection.dropped)

    def write() -> None:
        write_record(plan, out)
        if warm.sharded is None:
            write_checkpoint(*args, exclude=exclude)

    on_main(write)
    if warm.sharded is not None:  # FSDP2: every rank writes its shards
        write_sharded_checkpoint(*args, exclude=exclude)
    checkpoint = checkpoint_dir(out, warm.step)
    LOG.info(
        "ILA: the training continues from the warm-up's step %d (%s), with adapters on the %d kept modules only",
        warm.step,
        checkpoint,
        len(selection.kept),
    )
    return checkpoint


