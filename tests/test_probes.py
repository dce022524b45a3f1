"""The warm-up's probes: how many run, what the search says it adds before it
starts, and that how many run changes the search's cost, not its ranking."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import make_config, run_python, write_config

from axolotl_ila.ranking.file import load_ranking
from axolotl_ila.search.run import cost_line
from axolotl_ila.search.warmup import PROBES_WITHOUT_EARLY_STOP, probe_count, probe_interval


def test_without_the_early_stop_the_probes_do_not_grow_with_the_run():
    assert probe_interval(10, 45, early_stop=False) == 10  # a short warm-up keeps the window
    for cap in (225, 750, 2250, 7500):
        every = probe_interval(10, cap, early_stop=False)
        assert probe_count(every, cap) <= PROBES_WITHOUT_EARLY_STOP + 2  # step 1 and the cap besides
    assert probe_interval(10, 2250, early_stop=True) == 10  # the early stop decides from them
    assert probe_count(10, 45) == 6  # steps 1, 10, 20, 30, 40 and 45
    assert probe_count(29, 225) == 9  # steps 1, 29, ..., 203 and 225


def test_the_search_says_what_it_adds_in_steps():
    cfg = {"ila_stability_window": 10, "ila_warmup_early_stop": False, "ila_relearn_steps": None, "ila_gate_min_steps": 64, "ila_gate_steps": 128}
    cfg = SimpleNamespace(**cfg, get=cfg.get)  # read as axolotl's DictDefault is
    line = cost_line(cfg, cap=225, modules=210, continuing=True)
    assert line == (
        "it adds 9 probes, 32 re-learning steps and 64-128 gate steps, each about one training step; "
        "the warm-up's 225 steps train LoRA on all 210 modules, not only the kept ones, and the training continues from them"
    )
    assert "the warm-up's 225 steps come before the training, which starts afresh" in cost_line(cfg, 225, 210, continuing=False)


@pytest.mark.e2e
def test_how_many_probes_run_does_not_change_the_ranking(tiny_llama, tmp_path):
    """A probe takes no weight gradient and draws from a loader of its own."""
    rankings = []
    for window, early_stop in ((1, True), (1000, False)):
        out = tmp_path / f"w{window}"
        out.mkdir()
        ranking = out / "ranking.json"
        cfg = make_config(tiny_llama, out, ila_ranking=str(ranking), ila_gate_steps=8, ila_stability_window=window, ila_warmup_early_stop=early_stop, ila_warmup_min_steps=1000)
        done = run_python(["-m", "axolotl_ila.cli", "search", str(write_config(cfg, out / "config.yml"))], cwd=Path.cwd(), timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        rankings.append(load_ranking(ranking))
        assert "ILA search: it adds" in done.stdout + done.stderr
    every_step, fewest = rankings
    assert every_step.search["stage1"]["settle"]["check_every"] == 1 and fewest.search["stage1"]["settle"]["check_every"] == 1000
    assert every_step.search["stage1"]["steps"] == fewest.search["stage1"]["steps"]  # the early stop never fired (min steps)
    assert [(m.name, m.score) for m in every_step.modules] == [(m.name, m.score) for m in fewest.modules]
