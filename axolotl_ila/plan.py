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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from axolotl_ila.application import peft_exclude_modules
from axolotl_ila.args import output_dir
from axolotl_ila.architecture import fingerprint, model_units
from axolotl_ila.candidates import nothing_targeted_message, skeleton_model, target_candidates, user_excludes
from axolotl_ila.certainty import certainty_warnings
from axolotl_ila.distributed import is_main_process, on_main, same_on_all_ranks
from axolotl_ila.engines import continuation_refusal
from axolotl_ila.hub import is_hub_path
from axolotl_ila.ranking import (
    Ranking,
    RankingError,
    RankingFile,
    check_architecture,
    check_writable,
    load_ranking,
    locate_ranking,
    remove_stale_temp_files,
    save_ranking,
    write_bytes_atomic,
    write_json_atomic,
)
from axolotl_ila.search_config import continues_training
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
# The copy of the ranking a training used, beside the record in output_dir, so
# that the adapter's folder (and what hub_model_id pushes) carries it. A searched
# ranking that ``ila_ranking`` cannot take after the search is written there too.
RANKING_COPY_NAME = "ila_ranking.json"
FALLBACK_RANKING_NAME = RANKING_COPY_NAME


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
                f"the ranking less closely; see docs/fused-kernels.md)."
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
    return bool(cfg.auto_resume_from_checkpoints) and any(
        p.name.split("-")[-1].isdigit() for p in Path(output_dir(cfg)).glob("checkpoint-*")
    )


def read_record(path: Path) -> tuple[dict[str, Any], Selection]:
    """A run's ``ila_selection.json`` and its selection, or an error naming the file and the fix."""
    restore = f"Restore {path} from the run that wrote it, or start a fresh output_dir."
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SelectionError(f"{path} is not valid JSON ({exc}); it may have been cut short. {restore}") from exc
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise SelectionError(f"{path} is not an ILA selection record. {restore}")
    try:
        selection = Selection(
            kept=tuple(record["kept"]),
            dropped=tuple(record["dropped"]),
            strategy=str(record["strategy"]),
            mode=str(record["mode"]),
            fraction=float(record["fraction"]),
            groups=tuple(record.get("groups", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SelectionError(f"{path} has no valid {exc} entry. {restore}") from exc
    return record, selection


def same_rule(a: Selection, b: Selection) -> bool:
    """Same strategy, mode, fraction and whole groups (the modules may differ)."""
    return (a.strategy, a.mode, set(a.groups)) == (b.strategy, b.mode, set(b.groups)) and math.isclose(
        a.fraction, b.fraction
    )


def _selection_from_record(cfg: Any, info: ModelInfo, requested: Selection, current: Selection | None) -> Plan:
    """The recorded selection of the run being resumed, if the config still asks
    for it: the same rule (``requested``) in every case and, where the config's
    ranking can be read (``current``), the same modules too."""
    path = Path(cfg.output_dir) / RECORD_NAME
    if not path.exists():
        raise SelectionError(
            f"resuming in {cfg.output_dir}, which has no {RECORD_NAME}: its checkpoints were not "
            f"trained with an ILA selection, so their adapters would not fit. Resume without the "
            f"ILA plugin, or start a fresh output_dir."
        )
    record, selection = read_record(path)
    if record.get("model_fingerprint") != info.fingerprint:
        raise SelectionError(
            f"{path} records a selection for another architecture than {cfg.base_model}; "
            f"resume with the base model the run started with."
        )
    asked = current or requested
    if not same_rule(requested, selection) or (current is not None and set(current.kept) != set(selection.kept)):
        raise SelectionError(
            f"resuming in {cfg.output_dir}: the config now selects {len(asked.kept)} modules "
            f"({asked.strategy}, {asked.mode} {asked.fraction:g}) but the checkpoints were trained "
            f"on {len(selection.kept)} ({selection.strategy}, {selection.mode} {selection.fraction:g}, "
            f"recorded in {path}); their adapters would not fit. Restore the ILA settings of that "
            f"run (ila_strategy, fractions, ila_ranking, ila_fused_groups), or start a fresh output_dir."
        )
    LOG.info("ILA: resuming with the selection recorded in %s", path)
    return Plan(selection=selection, model=info, ranking_identity=record.get("ranking"))


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
        return _selection_from_record(cfg, info, requested, selection)
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


@dataclass
class FoundRanking:
    source: RankingFile  # where it is: ``ila_ranking`` (local or on the Hub), or the fallback a search wrote to
    ranking: Ranking
    warm: Any = None  # a search's warm-up state, when the training continues from it


def find_or_search_ranking(
    cfg: Any,
    info: ModelInfo,
    strategy: str,
    run_search: Callable[[Any, ModelInfo, bool], Any] | None,
    force_search: bool,
    training: bool,
    may_search: bool,
) -> FoundRanking | None:
    """The ranking at ``ila_ranking``: loaded, or searched and written there.
    None when the strategy uses no ranking, and, without ``may_search``, when
    there is none to load or the config asks for a new one."""
    if strategy not in RANKED_STRATEGIES:
        if cfg.ila_ranking:
            LOG.warning("ILA: ila_strategy: %s does not use ila_ranking (%s)", strategy, cfg.ila_ranking)
        return None
    mode = "always" if force_search else (cfg.ila_search or "auto")
    if is_hub_path(cfg.ila_ranking):
        # Fetched (or found in the Hugging Face cache), never searched for: a
        # search cannot write to the Hub (check_writable says what to do instead).
        if mode == "always":
            check_writable(cfg.ila_ranking, info.fingerprint)
        source = locate_ranking(cfg.ila_ranking)
    else:
        source = RankingFile(spec=str(cfg.ila_ranking), local_path=Path(cfg.ila_ranking))
    path = source.local_path
    if not may_search and (not path.exists() or mode == "always"):
        return None
    if training:
        check_copy_target(cfg, source, info.fingerprint)
    if mode == "never" or (mode == "auto" and path.exists()):
        ranking = load_ranking(path, label=source.spec)
        for warning in check_architecture(ranking, info.fingerprint, cfg.base_model, source.spec):
            LOG.warning("ILA: %s", warning)
        for warning in certainty_warnings(ranking.search):  # a fresh search logs its own
            LOG.warning("ILA: %s (%s)", warning, source.spec)
        if is_main_process() and source.hub is None:
            remove_stale_temp_files(path)
        return FoundRanking(source, ranking)
    check_writable(path, info.fingerprint)
    if run_search is None:
        raise RankingError(f"no ranking at {path} and no search available in this context.")
    continuing = training and continues_training(cfg)
    engine_reason = continuation_refusal(cfg)
    if training and cfg.adapter and cfg.ila_continue is None and engine_reason and is_main_process():
        LOG.warning("ILA: the training will start afresh after the search (ila_continue defaults to false here): %s", engine_reason)
    result = run_search(cfg, info, continuing)
    path = on_main(lambda: save_searched(result.ranking, path, output_dir(cfg)))
    ranking = load_ranking(path)
    if is_main_process():
        write_heatmap(ranking, path, cfg)
    return FoundRanking(RankingFile(spec=str(path), local_path=path), ranking, result.warm)


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
    from axolotl_ila.handoff import checkpoint_dir, write_checkpoint, write_sharded_checkpoint

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


def save_searched(ranking: Ranking, path: Path, output_dir: str | Path) -> Path:
    """Write a searched ranking to ``ila_ranking`` (checked writable before the
    search). If that still fails (the directory changed, another file appeared
    there), write it under ``output_dir``: a search is never lost. Returns where."""
    try:
        save_ranking(ranking, path)
        LOG.info("ILA: wrote ranking %s", path)
        return path
    except RankingError as exc:
        error, reason = exc, exc.problem
    except OSError as exc:
        error, reason = exc, exc.strerror or str(exc)
    fallback = Path(output_dir) / FALLBACK_RANKING_NAME
    if fallback.resolve() == path.resolve():
        raise error
    try:
        save_ranking(ranking, fallback)
    except (OSError, RankingError) as second:
        raise RankingError(
            f"the search finished, but its ranking could be written neither to ila_ranking {path} "
            f"({reason}) nor to {fallback} ({second})."
        ) from error
    LOG.warning(
        "ILA: the search finished, but its ranking could not be written to ila_ranking %s (%s). "
        "It is saved in %s instead, and this run trains with it; copy it to %s (or point "
        "ila_ranking at it) so that later runs reuse it instead of searching again.",
        path, reason, fallback, path,
    )
    return fallback


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
    """``ila_selection.json`` in ``output_dir``, and beside it a copy of the
    ranking the selection came from (``ila_ranking.json``), which the record names.
    Main process only."""
    if plan.ranking_file is not None and (plan.ranking_identity or {}).get("copy"):
        copy_ranking(plan.ranking_file, output_dir)
    path = Path(output_dir) / RECORD_NAME
    write_json_atomic(path, plan.record())
    return path


def model_card_note(plan: Plan, cfg: Any) -> str:
    """A few lines for the model card: what the adapter covers, chosen how, and
    the files in the folder that say which modules and why."""
    selection = plan.selection
    kept, total = len(selection.kept), len(selection.kept) + len(selection.dropped)
    how = f"`ila_strategy: {selection.strategy}`, {selection.mode} {selection.fraction:g}"
    if selection.strategy == "ila":
        chosen = f"chosen by ILA layer importance ([arXiv 2410.17875](https://arxiv.org/abs/2410.17875); {how})"
    else:
        chosen = f"chosen by axolotl-ila ({how})"
    what = (
        f"The LoRA adapter covers {kept} of the {total} candidate modules"
        if cfg.adapter
        else f"The training updated {kept} of the {total} candidate linear modules (the others stayed frozen)"
    )
    lines = ["## Layer selection (axolotl-ila)", "", f"{what}, {chosen}."]
    identity = plan.ranking_identity or {}
    if identity.get("copy"):
        origin = f", from `{identity['path']}`" if identity.get("hub") else ""
        lines.append(f"The ranking that chose them is `{identity['copy']}`{origin}; the kept and dropped modules are listed in `{RECORD_NAME}`.")
    else:
        lines.append(f"The kept and dropped modules are listed in `{RECORD_NAME}`.")
    return "\n".join(lines)


def check_copy_target(cfg: Any, source: RankingFile, fingerprint: str) -> None:
    """Before any expensive work: the ranking's copy can go to ``output_dir``
    (nothing there, the ranking itself, or an earlier copy of this architecture's
    ranking; never a file of the user's)."""
    target = Path(output_dir(cfg)) / RANKING_COPY_NAME
    if target.exists() and source.local_path.exists() and target.samefile(source.local_path):
        return
    try:
        check_writable(target, fingerprint)
    except RankingError as exc:
        raise RankingError(
            f"ILA copies the ranking a training uses into output_dir as {RANKING_COPY_NAME}, but {exc} "
            f"Use a fresh output_dir, or move {target} away."
        ) from exc


def copy_ranking(ranking_file: Path, output_dir: str | Path) -> Path:
    """The ranking's exact bytes (so its sha256 is the recorded one) as
    ``OUTPUT_DIR/ila_ranking.json``, atomically; a no-op when it is that file."""
    target = Path(output_dir) / RANKING_COPY_NAME
    if target.exists() and target.samefile(ranking_file):
        return target
    data = Path(ranking_file).read_bytes()
    if target.exists() and target.read_bytes() == data:
        return target
    check_writable(target, load_ranking(ranking_file).fingerprint)
    write_bytes_atomic(target, data)
    return target
