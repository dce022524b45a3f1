"""From a config to a selection: the decisions made before any model is built.

    config -> (skeleton of the model) -> ranking (loaded, or searched) -> selection

Everything that can be wrong with the user's input (a ranking for another model,
a fraction that leaves nothing, a file that must not be overwritten, a resumed
run whose adapters would change shape) is found here, from the model's meta-device
skeleton, before datasets or weights are loaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from axolotl_ila.application import nothing_targeted_message, skeleton_model, target_candidates
from axolotl_ila.architecture import fingerprint, model_units
from axolotl_ila.distributed import is_main_process, main_writes_all_read, same_on_all_ranks
from axolotl_ila.ranking import (
    Ranking,
    RankingError,
    check_architecture,
    check_writable,
    file_digest,
    load_ranking,
    save_ranking,
    write_json_atomic,
)
from axolotl_ila.selection import (
    FUSED_GROUPS,
    RANKED_STRATEGIES,
    Selection,
    SelectionError,
    importance_order,
    no_groups_note,
    select,
    split_groups,
)

LOG = logging.getLogger("axolotl.ila")

RECORD_NAME = "ila_selection.json"
RECORD_FORMAT = "axolotl-ila-selection"


@dataclass
class ModelInfo:
    """What the plan needs to know about the model, read off its skeleton."""

    fingerprint: str
    candidates: list[str]  # model order
    model_section: dict[str, Any]  # the ranking file's "model" section
    expert_candidates: tuple[str, ...] = ()  # the candidates that are expert parameters


@dataclass
class Plan:
    selection: Selection
    model: ModelInfo
    ranking_identity: dict[str, Any] | None  # path, digest and fingerprint of the ranking used

    def record(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "version": 1,
            "model_fingerprint": self.model.fingerprint,
            "ranking": self.ranking_identity,
            **self.selection.to_json(),
        }


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


KERNEL_OF_GROUP = {"qkv": "lora_qkv_kernel", "mlp": "lora_mlp_kernel"}


def fused_groups(cfg: Any) -> tuple[str, ...]:
    """The fused groups kept or dropped whole: all of them with ``ila_fused_groups: true``."""
    return tuple(FUSED_GROUPS) if cfg.ila_fused_groups else ()


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
                f"the ranking less closely; see the README's Fused LoRA kernels)."
            )
    return messages


def selection_kwargs(cfg: Any) -> dict[str, Any]:
    return {
        "drop_fraction": cfg.ila_drop_fraction,
        "keep_fraction": cfg.ila_keep_fraction,
        "groups": fused_groups(cfg),
    }


def is_resuming(cfg: Any) -> bool:
    if cfg.resume_from_checkpoint:
        return True
    output_dir = Path(cfg.output_dir or "./model-out")
    return bool(cfg.auto_resume_from_checkpoints) and any(
        p.name.split("-")[-1].isdigit() for p in output_dir.glob("checkpoint-*")
    )


def ranking_identity(path: str | Path, ranking: Ranking) -> dict[str, Any]:
    return {"path": str(path), "digest": file_digest(path), "fingerprint": ranking.fingerprint}


def _selection_from_record(cfg: Any, info: ModelInfo, current: Selection | None) -> Plan:
    path = Path(cfg.output_dir) / RECORD_NAME
    if not path.exists():
        raise SelectionError(
            f"resuming in {cfg.output_dir}, which has no {RECORD_NAME}: its checkpoints were not "
            f"trained with an ILA selection, so their adapters would not fit. Resume without the "
            f"ILA plugin, or start a fresh output_dir."
        )
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("format") != RECORD_FORMAT:
        raise SelectionError(f"{path} is not an ILA selection record; start a fresh output_dir.")
    if record.get("model_fingerprint") != info.fingerprint:
        raise SelectionError(
            f"{path} records a selection for another architecture than {cfg.base_model}; "
            f"resume with the base model the run started with."
        )
    selection = Selection(
        kept=tuple(record["kept"]),
        dropped=tuple(record["dropped"]),
        strategy=record["strategy"],
        mode=record["mode"],
        fraction=record["fraction"],
        groups=tuple(record.get("groups", ())),
    )
    if current is not None and set(current.kept) != set(selection.kept):
        raise SelectionError(
            f"resuming in {cfg.output_dir}: the config now selects {len(current.kept)} modules "
            f"({current.strategy}, {current.mode} {current.fraction:g}) but the checkpoints were trained "
            f"on {len(selection.kept)} ({selection.strategy}, {selection.mode} {selection.fraction:g}, "
            f"recorded in {path}); their adapters would not fit. Restore the ILA settings of that "
            f"run (ila_strategy, fractions, ila_ranking, ila_fused_groups), or start a fresh output_dir."
        )
    LOG.info("ILA: resuming with the selection recorded in %s", path)
    return Plan(selection=selection, model=info, ranking_identity=record.get("ranking"))


def resolve_plan(
    cfg: Any,
    run_search: Callable[[Any, ModelInfo], Ranking] | None = None,
    force_search: bool = False,
) -> Plan:
    """Decide the selection for this run. ``run_search(cfg, info)`` is called
    only when the config asks for a search (or ``force_search``)."""
    info = describe_model(cfg)
    strategy = cfg.ila_strategy or "ila"
    rule = selection_kwargs(cfg)
    # Fraction errors (nothing left, nothing dropped) before any expensive work.
    select(info.candidates, info.candidates, strategy, **rule)

    resuming = is_resuming(cfg) and not force_search
    if strategy not in RANKED_STRATEGIES:
        if cfg.ila_ranking:
            LOG.warning("ILA: ila_strategy: %s does not use ila_ranking (%s)", strategy, cfg.ila_ranking)
        order = importance_order(info.candidates, strategy, seed=cfg.ila_seed if cfg.ila_seed is not None else 42)
        selection = select(info.candidates, order, strategy, **rule)
        if resuming:
            return _selection_from_record(cfg, info, selection)
        return Plan(selection=selection, model=info, ranking_identity=None)

    path = Path(cfg.ila_ranking)
    mode = "always" if force_search else (cfg.ila_search or "auto")
    if resuming and (not path.exists() or mode == "always"):
        # A resumed run never searches: its adapters already have a shape.
        return _selection_from_record(cfg, info, None)

    if mode == "never" or (mode == "auto" and path.exists()):
        ranking = load_ranking(path)
        for warning in check_architecture(ranking, info.fingerprint, cfg.base_model, path):
            LOG.warning("ILA: %s", warning)
    else:
        check_writable(path, info.fingerprint)
        if run_search is None:
            raise RankingError(f"no ranking at {path} and no search available in this context.")
        searched = run_search(cfg, info)
        ranking = main_writes_all_read(lambda: save_ranking(searched, path), lambda: load_ranking(path))
        LOG.info("ILA: wrote ranking %s", path)
        if is_main_process():
            write_heatmap(ranking, path, cfg)

    order = importance_order(info.candidates, strategy, ranking=ranking)
    selection = select(info.candidates, order, strategy, **rule)
    if resuming:
        return _selection_from_record(cfg, info, selection)
    identity = ranking_identity(path, ranking)
    if not same_on_all_ranks(identity["digest"]):
        raise RankingError(f"ranking file {path} differs between processes; put it on a filesystem all ranks share.")
    return Plan(selection=selection, model=info, ranking_identity=identity)


def write_heatmap(ranking: Ranking, ranking_path: Path, cfg: Any) -> None:
    """The ranking's picture next to it (``ranking.png``), at the run's fractions."""
    from axolotl_ila.plots import heatmap

    png = ranking_path.with_suffix(".png")
    if png.exists() and png.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        LOG.warning("ILA: %s exists and is not a PNG; not overwriting it with the heatmap", png)
        return
    try:
        heatmap(ranking, png, **selection_kwargs(cfg))
    except SelectionError:
        # The run's fraction does not apply to every module set (e.g. combined
        # rankings); draw the default drop 25% instead.
        heatmap(ranking, png)
    LOG.info("ILA: heatmap %s", png)


def write_record(plan: Plan, output_dir: str | Path) -> Path:
    path = Path(output_dir) / RECORD_NAME
    write_json_atomic(path, plan.record())
    return path
