"""Where a run's ranking comes from (``ranking_source``): one test per row of the
decision table, first as the table itself, then as what ``find_or_search_ranking``
does for that row with a real file (or none) at ``ila_ranking``."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from axolotl_ila.candidates import ModelInfo
from axolotl_ila.ranking.file import Ranking, RankingError, load_ranking, save_ranking
from axolotl_ila.ranking_source import RULES, Action, find_or_search_ranking, ranking_action
from axolotl_ila.search.run import SearchResult

NAMES = [f"model.layers.{b}.mlp.{kind}" for b in range(2) for kind in ("up_proj", "down_proj")]
FINGERPRINT = "sha256:" + "d" * 64

# (may search, ila_search, a file at ila_ranking) -> what happens; written out
# here, not read from RULES, so that a changed rule fails its row.
ROWS = [
    ((True, "auto", True), Action.LOAD),
    ((True, "auto", False), Action.SEARCH),
    ((True, "always", True), Action.SEARCH),
    ((True, "always", False), Action.SEARCH),
    ((True, "never", True), Action.LOAD),
    ((True, "never", False), Action.LOAD),
    ((False, "auto", True), Action.LOAD),
    ((False, "auto", False), Action.NONE),
    ((False, "always", True), Action.NONE),
    ((False, "always", False), Action.NONE),
    ((False, "never", True), Action.LOAD),
    ((False, "never", False), Action.NONE),
]


def info() -> ModelInfo:
    return ModelInfo(fingerprint=FINGERPRINT, candidates=NAMES, model_section={"fingerprint": FINGERPRINT, "base_model": "tiny"})


def ranking(first: str = NAMES[0]) -> Ranking:
    scores = {name: (10.0 if name == first else -float(i)) for i, name in enumerate(NAMES)}
    return Ranking.from_scores(scores, model=info().model_section, search={"method": "test"})


def test_the_table_covers_every_case_once():
    assert sorted(RULES) == sorted(key for key, _ in ROWS)


@pytest.mark.parametrize(("key", "action"), ROWS, ids=[f"{'may' if k[0] else 'resuming'}-{k[1]}-{'file' if k[2] else 'none'}" for k, _ in ROWS])
def test_each_row_of_the_table(key, action, tmp_path, caplog):
    may_search, mode, exists = key
    assert ranking_action("ila", may_search, mode, exists) is action

    path = tmp_path / "rankings" / "r.json"
    if exists:
        path.parent.mkdir()
        save_ranking(ranking(NAMES[0]), path)
    searched = []

    def run_search(cfg, model, continuing):
        searched.append(continuing)
        return SearchResult(ranking=ranking(NAMES[-1]), warm=None)

    cfg = SimpleNamespace(
        ila_ranking=str(path), ila_search=mode, base_model="tiny", output_dir=str(tmp_path / "run"), adapter="lora",
        ila_continue=False, ila_drop_fraction=0.25, ila_keep_fraction=None, ila_fused_groups=False,
    )
    cfg.get = lambda key, default=None: getattr(cfg, key, default)
    if action is Action.LOAD and not exists:
        with pytest.raises(RankingError, match="does not exist"):
            find_or_search_ranking(cfg, info(), "ila", run_search, force_search=False, training=False, may_search=may_search)
        return
    found = find_or_search_ranking(cfg, info(), "ila", run_search, force_search=False, training=False, may_search=may_search)
    if action is Action.NONE:
        assert found is None and not searched
    elif action is Action.LOAD:
        assert found.ranking.names[0] == NAMES[0] and not searched
    else:
        assert searched == [False]
        assert found.ranking.names[0] == NAMES[-1]
        assert load_ranking(path).names[0] == NAMES[-1]  # written to ila_ranking


@pytest.mark.parametrize("strategy", ["random", "first", "last", "mid_block"])
def test_a_strategy_without_a_ranking_never_loads_or_searches(strategy, caplog):
    for key, _ in ROWS:
        assert ranking_action(strategy, *key) is Action.NONE
    cfg = SimpleNamespace(ila_ranking="somewhere.json", ila_search="always")
    with caplog.at_level(logging.WARNING, logger="axolotl.ila"):
        assert find_or_search_ranking(cfg, info(), strategy, None, force_search=True, training=True, may_search=True) is None
    assert f"ila_strategy: {strategy} does not use ila_ranking" in caplog.text
