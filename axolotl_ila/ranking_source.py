"""Where a run's ranking comes from: loaded from ``ila_ranking`` (a local file or
the Hub), searched and written there, or none (a strategy that needs no ranking,
a resumed run whose checkpoints already fix the selection)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from axolotl_ila.args import output_dir, selection_kwargs
from axolotl_ila.atomic import remove_stale_temp_files
from axolotl_ila.candidates import ModelInfo
from axolotl_ila.outputs import check_copy_target, save_searched, write_heatmap
from axolotl_ila.ranking.file import Ranking, RankingError, RankingFile, check_architecture, check_writable, load_ranking, locate_ranking
from axolotl_ila.ranking.hub import is_hub_path
from axolotl_ila.runtime.distributed import is_main_process, on_main
from axolotl_ila.runtime.engines import continuation_refusal
from axolotl_ila.search.certainty import certainty_warnings
from axolotl_ila.search.settings import continues_training
from axolotl_ila.selection import RANKED_STRATEGIES

LOG = logging.getLogger("axolotl.ila")


@dataclass
class FoundRanking:
    source: RankingFile  # where it is: ``ila_ranking`` (local or on the Hub), or the fallback a search wrote to
    ranking: Ranking
    warm: Any = None  # a search's warm-up state, when the training continues from it


class Action(Enum):
    NONE = "none"  # no ranking: the strategy needs none, or a resumed run's record decides
    LOAD = "load"  # read ``ila_ranking`` (an error names the file if it is missing or invalid)
    SEARCH = "search"  # search, and write ``ila_ranking``


# The whole decision, for a strategy that orders modules by a ranking
# (``RANKED_STRATEGIES``; any other strategy: Action.NONE). Keys:
# (may search, ila_search, a file at ila_ranking). A run that resumes from its
# checkpoints may not search: its adapters already have a shape, and its
# selection record says which modules they cover.
RULES: dict[tuple[bool, str, bool], Action] = {
    (True, "auto", True): Action.LOAD,
    (True, "auto", False): Action.SEARCH,
    (True, "always", True): Action.SEARCH,  # a refreshed search replaces it
    (True, "always", False): Action.SEARCH,
    (True, "never", True): Action.LOAD,
    (True, "never", False): Action.LOAD,  # fails, naming the file and the fix
    (False, "auto", True): Action.LOAD,  # checked against the record
    (False, "auto", False): Action.NONE,
    (False, "always", True): Action.NONE,  # the config asks for a new one: the record decides
    (False, "always", False): Action.NONE,
    (False, "never", True): Action.LOAD,
    (False, "never", False): Action.NONE,
}


def ranking_action(strategy: str, may_search: bool, mode: str, exists: bool) -> Action:
    if strategy not in RANKED_STRATEGIES:
        return Action.NONE
    return RULES[(may_search, mode, exists)]


def find_or_search_ranking(
    cfg: Any,
    info: ModelInfo,
    strategy: str,
    run_search: Callable[[Any, ModelInfo, bool], Any] | None,
    force_search: bool,
    training: bool,
    may_search: bool,
) -> FoundRanking | None:
    """The ranking at ``ila_ranking``: loaded, or searched and written there, as
    ``RULES`` says; None for ``Action.NONE``. ``force_search``: as
    ``ila_search: always`` (``axolotl-ila search``)."""
    if strategy not in RANKED_STRATEGIES:
        if cfg.ila_ranking:
            LOG.warning("ILA: ila_strategy: %s does not use ila_ranking (%s)", strategy, cfg.ila_ranking)
        return None
    mode = "always" if force_search else (cfg.ila_search or "auto")
    source = ranking_file(cfg, mode, info.fingerprint)
    action = ranking_action(strategy, may_search, mode, source.local_path.exists())
    if action is Action.NONE:
        return None
    if training:
        check_copy_target(cfg, source, info.fingerprint)
    if action is Action.LOAD:
        return load_found(cfg, info, source)
    return search_and_save(cfg, info, source.local_path, run_search, training)


def ranking_file(cfg: Any, mode: str, fingerprint: str) -> RankingFile:
    """``ila_ranking`` on this machine. A Hub ranking is fetched (or found in the
    Hugging Face cache), never searched for: a search cannot write to the Hub
    (``check_writable`` says what to do instead)."""
    if not is_hub_path(cfg.ila_ranking):
        return RankingFile(spec=str(cfg.ila_ranking), local_path=Path(cfg.ila_ranking))
    if mode == "always":
        check_writable(cfg.ila_ranking, fingerprint)
    return locate_ranking(cfg.ila_ranking)


def load_found(cfg: Any, info: ModelInfo, source: RankingFile) -> FoundRanking:
    ranking = load_ranking(source.local_path, label=source.spec)
    for warning in check_architecture(ranking, info.fingerprint, cfg.base_model, source.spec):
        LOG.warning("ILA: %s", warning)
    for warning in certainty_warnings(ranking.search):  # a fresh search logs its own
        LOG.warning("ILA: %s (%s)", warning, source.spec)
    if is_main_process() and source.hub is None:
        remove_stale_temp_files(source.local_path)
    return FoundRanking(source, ranking)


def search_and_save(
    cfg: Any, info: ModelInfo, path: Path, run_search: Callable[[Any, ModelInfo, bool], Any] | None, training: bool
) -> FoundRanking:
    """Search, and write the ranking to ``path`` (checked writable first: a
    search is never run only to be lost), with its heatmap beside it."""
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
        write_heatmap(ranking, path, selection_kwargs(cfg))
    return FoundRanking(RankingFile(spec=str(path), local_path=path), ranking, result.warm)
