"""Bad input and faults: typos, conflicting plugins, unwritable paths, killed
writers, resumed runs whose config changed, broken records, empty data.

Config checks go through axolotl's own ``load_cfg``; plan checks through
``resolve_plan`` on a loaded config (what the plugin calls); what is a run's
behaviour goes through the real ``python -m axolotl.cli.train``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import TEST_ENV, adapter_modules, make_config, read_json, run_train, write_config

from axolotl_ila.atomic import write_jsonl
from axolotl_ila.candidates import ModelInfo, describe_model
from axolotl_ila.cli.commands import main
from axolotl_ila.cli.workspace import make_alpaca_rows
from axolotl_ila.outputs import write_record
from axolotl_ila.plan import resolve_plan
from axolotl_ila.ranking.file import Ranking, load_ranking, save_ranking
from axolotl_ila.record import RECORD_NAME
from axolotl_ila.search.run import SearchResult
from axolotl_ila.selection import SelectionError

SPECTRUM = "axolotl.integrations.spectrum.SpectrumPlugin"


def model_order_ranking(info: ModelInfo, path: Path | None) -> Ranking:
    """A valid ranking: most important first is model order (update norms: the reverse)."""
    scores = {name: -float(i) for i, name in enumerate(info.candidates)}
    norms = {name: float(i) for i, name in enumerate(info.candidates)}
    ranking = Ranking.from_scores(scores, model=info.model_section, search={"method": "test"}, update_norms=norms)
    if path is not None:
        save_ranking(ranking, path)
    return ranking


def fake_info(names: list[str]) -> ModelInfo:
    fingerprint = "sha256:" + "c" * 64
    return ModelInfo(fingerprint=fingerprint, candidates=names, model_section={"fingerprint": fingerprint})


def no_search(cfg, info, keep_warm_state):
    pytest.fail("the plan searched, but it had to stop or reuse what exists")


def dead_pid() -> int:
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def unwritable_dir() -> Path:
    """/sys takes no new regular files, even from root (tests here run as root,
    so a chmod would not do)."""
    try:
        fd, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        return Path("/sys")
    os.close(fd)
    os.unlink(probe)
    pytest.skip("/sys is writable on this machine")


# -- config load ------------------------------------------------------------------


def test_a_misspelt_ila_key_is_refused_with_the_nearest_known_key(refused):
    refused(r"unknown config key ila_dropfraction for axolotl_ila.ILAPlugin; did you mean ila_drop_fraction\?", ila_dropfraction=0.3)


def test_an_unknown_ila_key_without_a_near_one_lists_the_known_keys(refused):
    message = refused(r"unknown config key ila_wxyz", ila_wxyz="blue")
    assert "known keys:" in message and "ila_keep_fraction" in message


@pytest.fixture
def spectrum_unregistered():
    """load_cfg registers Spectrum in axolotl's process-wide plugin manager; take it out again."""
    yield
    from axolotl.integrations.base import PluginManager

    PluginManager.get_instance().plugins.pop(SPECTRUM, None)


def loader_takes_module_colon_class() -> bool:
    """axolotl 0.21's plugin loader also takes ``module:Class`` (the entry-point
    form) and registers it under the dotted name; 0.19's takes only ``module.Class``."""
    import axolotl.integrations.base

    return hasattr(axolotl.integrations.base, "normalize_plugin_name")


SPECTRUM_COLON = "axolotl.integrations.spectrum:SpectrumPlugin"


@pytest.mark.parametrize("adapter", [None, "lora"])
@pytest.mark.parametrize(
    "name",
    [
        SPECTRUM,
        pytest.param(
            SPECTRUM_COLON,
            marks=pytest.mark.skipif(
                not loader_takes_module_colon_class(),
                reason="axolotl 0.19's loader takes plugins as module.Class only; the module:Class form "
                "came with 0.21 (test_spectrum_is_recognised_in_the_module_colon_class_form checks ILA's "
                "check itself on every version)",
            ),
        ),
    ],
)
def test_spectrum_and_ila_in_one_config_are_refused_at_config_load(refused, spectrum_unregistered, adapter, name):
    refused(
        rf"{re.escape(name)} and axolotl_ila.ILAPlugin both decide which layers train; remove one",
        adapter=adapter,
        plugins=["axolotl_ila.ILAPlugin", name],
        spectrum_model_name="tiny/llama",
    )


def test_spectrum_is_recognised_in_the_module_colon_class_form():
    """ILA's check reads the raw config's plugin names, in either form the
    loader of some axolotl version takes."""
    from axolotl_ila.args import check_combination

    with pytest.raises(ValueError, match=rf"{re.escape(SPECTRUM_COLON)} and axolotl_ila.ILAPlugin both decide which layers train"):
        check_combination({"adapter": "lora", "ila_strategy": "first", "plugins": ["axolotl_ila.ILAPlugin", SPECTRUM_COLON]})


@pytest.mark.parametrize("excludes", [["model.layers.0.mlp.down_proj"], r".*\.layers\.0\.mlp\.down_proj"])
def test_user_lora_exclude_modules_survive_validation(load, excludes):
    cfg = load(lora_exclude_modules=excludes)
    assert cfg.lora_exclude_modules == excludes
    assert "model.layers.0.mlp.down_proj" not in describe_model(cfg).candidates
    assert len(describe_model(cfg).candidates) == 27


# -- writing the ranking ----------------------------------------------------------


def test_a_ranking_that_cannot_be_written_after_the_search_is_saved_under_output_dir(load, monkeypatch, caplog):
    cfg = load()
    path = Path(cfg.ila_ranking)
    real_mkstemp = tempfile.mkstemp

    def search_then_the_directory_turns_read_only(cfg, info, keep_warm_state):
        def mkstemp(*args, dir=None, **kwargs):
            if Path(dir) == path.parent:
                raise PermissionError(13, "Permission denied")
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        path.parent.mkdir(parents=True)
        return SearchResult(ranking=model_order_ranking(info, None), warm=None)

    with caplog.at_level(logging.WARNING, logger="axolotl.ila"):
        plan = resolve_plan(cfg, run_search=search_then_the_directory_turns_read_only)
    fallback = Path(cfg.output_dir) / "ila_ranking.json"
    assert not path.exists()
    assert load_ranking(fallback).names == model_order_ranking(describe_model(cfg), None).names
    assert plan.ranking_identity["path"] == str(fallback)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert f"could not be written to ila_ranking {path} (creating a file in {path.parent} fails (Permission denied))" in warning
    assert f"saved in {fallback} instead, and this run trains with it" in warning


def test_a_ranking_path_the_run_cannot_write_stops_before_the_search(tiny_llama, tmp_path):
    ranking = unwritable_dir() / "ila-test" / "ranking.json"
    cfg = make_config(tiny_llama, tmp_path, ila_ranking=str(ranking))
    result = run_train(write_config(cfg, tmp_path / "config.yml"), check=False)
    assert result.returncode != 0
    assert f"cannot write {ranking}: creating a file in /sys fails" in result.stderr
    assert "Make /sys writable, or choose a path this run can write (`ila_ranking`" in result.stderr
    assert "ILA search: warm-up" not in result.stdout + result.stderr
    assert not (tmp_path / "prepared").exists()


def test_a_file_appearing_at_ila_ranking_during_the_search_leaves_the_ranking_in_output_dir(tiny_llama, tmp_path):
    """A real run: the search writes its ranking under output_dir, says so, and trains with it."""
    ranking = tmp_path / "rankings" / "tiny.json"
    cfg = make_config(tiny_llama, tmp_path, ila_ranking=str(ranking), ila_gate_steps=8, ila_warmup_max_steps=10, max_steps=4)
    config = write_config(cfg, tmp_path / "config.yml")
    log = tmp_path / "train.log"
    env = {**os.environ, **TEST_ENV}
    with open(log, "w") as handle:
        run = subprocess.Popen([sys.executable, "-m", "axolotl.cli.train", str(config)], stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        deadline = time.time() + 300
        while "ILA search: warm-up" not in log.read_text() and run.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        # The path was checked before the search; now someone else's file is there.
        ranking.parent.mkdir(parents=True, exist_ok=True)
        ranking.write_text("my notes\n")
        assert run.wait(timeout=600) == 0, log.read_text()[-6000:]
    output = log.read_text()
    fallback = tmp_path / "run" / "ila_ranking.json"
    assert ranking.read_text() == "my notes\n"
    assert f"saved in {fallback} instead" in output
    record = read_json(tmp_path / "run" / RECORD_NAME)
    assert record["ranking"]["path"] == str(fallback)
    assert adapter_modules(tmp_path / "run") == set(load_ranking(fallback).names[:21])


def test_stale_temp_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    path = tmp_path / "r.json"
    host, pid, hours_ago = socket.gethostname(), dead_pid(), time.time() - 7200
    stale = [f".r.json.{host}.{pid}.abc123_x.tmp", ".r.json.k2j3h4g5.tmp", f".r.json.otherhost.{pid}.q1w2e3r4.tmp"]
    kept = [
        f".r.json.{host}.{os.getpid()}.def456gh.tmp",  # a writer still running
        ".r.json.abcdefgh.tmp",  # unnamed writer (older version, other host): maybe live while recent
        ".r.json.otherhost.12.zxcvbnm1.tmp",
        f".other.json.{host}.{pid}.abc123_x.tmp",  # not beside r.json
        "notes.tmp",
    ]
    for name in stale + kept:
        (tmp_path / name).write_text("{")
    for name in stale[1:]:
        os.utime(tmp_path / name, (hours_ago, hours_ago))
    save_ranking(model_order_ranking(fake_info(["a.q_proj", "a.k_proj"]), None), path)
    assert {p.name for p in tmp_path.iterdir()} == set(kept) | {"r.json"}


def test_a_run_that_only_reads_the_ranking_removes_its_stale_temp_files(load, tmp_path):
    cfg = load()
    path = Path(cfg.ila_ranking)
    model_order_ranking(describe_model(cfg), path)
    stale = path.parent / f".{path.name}.{socket.gethostname()}.{dead_pid()}.abcdefgh.tmp"
    stale.write_text('{"format": "axolotl-ila-ran')
    resolve_plan(cfg, run_search=no_search)
    assert not stale.exists() and path.exists()


# -- combine ----------------------------------------------------------------------


def test_combine_refuses_an_output_that_is_one_of_its_inputs(tmp_path, capsys):
    info = fake_info([f"model.layers.{i}.mlp.down_proj" for i in range(4)])
    a = tmp_path / "a.json"
    model_order_ranking(info, a)
    b = tmp_path / "b.json"
    scores = {name: float(i) for i, name in enumerate(info.candidates)}  # reversed order
    save_ranking(Ranking.from_scores(scores, model=info.model_section, search={}), b)
    before = b.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.json").symlink_to(b)
    for out in (b, tmp_path / "sub" / ".." / "b.json", tmp_path / "link.json"):
        assert main(["combine", str(a), str(b), "-o", str(out)]) == 2
        assert f"-o {out} is one of the input rankings ({b})" in capsys.readouterr().err
        assert b.read_bytes() == before
    assert main(["combine", str(a), str(b), "-o", str(tmp_path / "c.json")]) == 0
    assert load_ranking(tmp_path / "c.json").search["method"] == "combine"


# -- resuming ---------------------------------------------------------------------


@pytest.fixture
def interrupted_run(load, tmp_path):
    """A run that recorded its selection (ranking in model order, drop 0.25) and
    left a checkpoint; ``load(**overrides)`` then loads the resuming config."""
    cfg = load()
    info = describe_model(cfg)
    model_order_ranking(info, Path(cfg.ila_ranking))
    plan = resolve_plan(cfg, run_search=no_search)
    write_record(plan, cfg.output_dir)
    (Path(cfg.output_dir) / "checkpoint-2").mkdir()
    return {"cfg": cfg, "plan": plan, "record": Path(cfg.output_dir) / RECORD_NAME}


@pytest.mark.parametrize("ranking", ["present", "missing", "ila_search: always"])
@pytest.mark.parametrize("change", [{"ila_drop_fraction": 0.5}, {"ila_fused_groups": True}, {"ila_strategy": "update_norm"}])
def test_resume_refuses_a_changed_selection_whether_or_not_the_ranking_is_there(interrupted_run, load, ranking, change):
    overrides = {"auto_resume_from_checkpoints": True}
    if ranking == "missing":
        Path(interrupted_run["cfg"].ila_ranking).unlink()
    if ranking == "ila_search: always":
        overrides["ila_search"] = "always"
    record_before = interrupted_run["record"].read_bytes()

    resumed = resolve_plan(load(**overrides), run_search=no_search)
    assert resumed.selection.kept == interrupted_run["plan"].selection.kept

    with pytest.raises(SelectionError, match=r"resuming in .* their adapters would not fit"):
        resolve_plan(load(**overrides, **change), run_search=no_search)
    assert interrupted_run["record"].read_bytes() == record_before


@pytest.mark.parametrize("content", ['{"format": "axolotl-ila-selection", "kept": ["model.la', "", '{"format": "axolotl-ila-selection"}'])
def test_a_broken_selection_record_names_the_file(interrupted_run, load, content):
    record = interrupted_run["record"]
    record.write_text(content)
    with pytest.raises(SelectionError) as info:
        resolve_plan(load(auto_resume_from_checkpoints=True), run_search=no_search)
    assert str(record) in str(info.value)
    assert "Restore" in str(info.value) and "or start a fresh output_dir" in str(info.value)
    assert record.read_text() == content


# -- runs -------------------------------------------------------------------------


def test_user_excluded_module_gets_no_adapter_and_is_no_candidate(tiny_llama, tmp_path):
    excluded = "model.layers.0.mlp.down_proj"
    cfg = make_config(tiny_llama, tmp_path, ila_strategy="last", lora_exclude_modules=[excluded], max_steps=2)
    run_train(write_config(cfg, tmp_path / "config.yml"))
    record = read_json(tmp_path / "run" / RECORD_NAME)
    assert excluded not in record["kept"] + record["dropped"]
    assert len(record["kept"]) + len(record["dropped"]) == 27
    assert len(record["dropped"]) == 7  # round(0.25 * 27)
    assert adapter_modules(tmp_path / "run") == set(record["kept"])


@pytest.mark.parametrize("data", ["empty file", "every row too long"])
def test_search_without_training_rows_stops_before_the_search_model_is_built(tiny_llama, tmp_path, data):
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir()
    if data == "empty file":
        path.write_text("\n")
        message = f"dataset file {path} is empty, so the ILA search has nothing to train on"
    else:
        write_jsonl(path, [dict(row, output=row["output"] + " word" * 300) for row in make_alpaca_rows(8)])
        message = (
            f"the ILA search has no training rows: after axolotl's preprocessing nothing is left of datasets "
            f"{path} (type alpaca). Likely causes: every row is longer than sequence_len (128)"
        )
    ranking = tmp_path / "ranking.json"
    cfg = make_config(tiny_llama, tmp_path, ila_ranking=str(ranking))
    cfg["datasets"][0]["path"] = str(path)
    result = run_train(write_config(cfg, tmp_path / "config.yml"), check=False)
    assert result.returncode != 0
    assert message in " ".join(result.stderr.split())
    assert "ILA search: warm-up" not in result.stdout + result.stderr
    assert not ranking.exists() and not (tmp_path / "run" / ".ila_search").exists()

