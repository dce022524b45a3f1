"""Shared fixtures: tiny local models and data, and a runner for the real
``python -m axolotl.cli.train``. Nothing is downloaded."""

from __future__ import annotations

import os

# The suite runs on two xdist workers (pyproject's addopts); each worker, and
# every training it starts, uses one thread, or two torch jobs on two cores
# slow each other down many times over.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from pathlib import Path
from typing import Any

import pytest
from helpers import make_config, run_train, write_config
from pydantic import ValidationError

from benchmarks.common.tiny_models import build_workspace

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# The files that take longest, longest first (summed test time of a full run on
# the 2-core VM). pytest-xdist's ``--dist loadfile`` hands a worker a whole file
# each time it runs short of work, in collection order (pyproject's addopts turn
# off its own reordering, by number of tests); started first, the long files
# cannot be left to one worker alone at the end while the other idles.
LONGEST_FIRST = [
    "test_multiproc.py", "test_deepspeed.py", "test_planted.py", "test_continue.py", "test_e2e_train.py",
    "test_preference.py", "test_sharing.py", "test_retention_bench.py", "test_bad_input.py", "test_cli.py",
    "test_model_families.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> dict[str, Path]:
    return build_workspace(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def tiny_neox(tmp_path_factory) -> dict[str, Path]:
    return build_workspace(tmp_path_factory.mktemp("neox"), "gpt_neox")


@pytest.fixture(scope="session")
def searched(tiny_llama, tmp_path_factory) -> dict[str, Any]:
    """One real training run with no ranking present: it searches, writes the
    ranking (and its heatmap), then trains. Shared by the tests that need a
    ranking made by the real search."""
    out = tmp_path_factory.mktemp("searched")
    ranking = out / "rankings" / "tiny-llama.json"
    cfg = make_config(tiny_llama, out, ila_ranking=str(ranking), ila_gate_steps=16)
    result = run_train(write_config(cfg, out / "config.yml"))
    return {"out": out, "ranking": ranking, "result": result, "cfg": cfg}


@pytest.fixture(scope="module")
def load_cfg():
    from axolotl.cli.config import load_cfg

    return load_cfg


@pytest.fixture(autouse=True)
def restore_environment():
    """Every test: load_cfg exports settings (ACCELERATE_MIXED_PRECISION, ...); keep them out of later tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def files_under(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@pytest.fixture
def load(tiny_llama, tmp_path, load_cfg):
    """Write a config with these overrides to a YAML file and load it as axolotl does."""

    def _load(adapter: str | None = "lora", **overrides):
        cfg = make_config(tiny_llama, tmp_path, adapter=adapter, ila_ranking=str(tmp_path / "rankings" / "tiny.json"))
        cfg.update(overrides)
        cfg = {k: v for k, v in cfg.items() if v is not None}
        path = write_config(cfg, tmp_path / "config.yml")
        return load_cfg(str(path))

    return _load


@pytest.fixture
def refused(load, tmp_path):
    """Load a config that must be refused: return the error text, check nothing was written."""

    def _refused(match: str, adapter: str | None = "lora", **overrides) -> str:
        before = files_under(tmp_path)
        with pytest.raises(ValidationError, match=match) as info:
            load(adapter=adapter, **overrides)
        after = files_under(tmp_path)
        assert after == before | {tmp_path / "config.yml"}, f"a refused config wrote {after - before}"
        assert not (tmp_path / "rankings").exists()
        assert not (tmp_path / "run").exists()
        return str(info.value)

    return _refused
