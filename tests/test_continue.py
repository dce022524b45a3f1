"""End to end: the training continues from the search's warm-up (one run).

The warm-up is the training's first steps: after the gates, the run resumes
from the warm-up's state with adapters on the kept modules only, and still ends
at ``max_steps``. Checked on outputs: which adapter weights exist at each
checkpoint, that the kept adapters start from the warm-up's weights (a fresh
LoRA A is random, so one training step from fresh weights would be far off),
the step count, and a resumed run's selection.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import TEST_ENV, adapter_modules, load_tensors, make_config, read_json, run_train, write_config

from axolotl_ila.ranking.file import load_ranking

pytestmark = pytest.mark.e2e

WARMUP = 8  # forced: min steps = cap


def continuing_config(workspace, out, **overrides):
    return make_config(
        workspace,
        out,
        ila_ranking=str(out / "ranking.json"),
        max_steps=20,
        ila_warmup_max_steps=WARMUP,
        ila_warmup_min_steps=WARMUP,
        ila_gate_steps=16,
        save_strategy="steps",
        save_steps=9,
        **overrides,
    )


def relative_change(after: torch.Tensor, before: torch.Tensor) -> float:
    return float((after.float() - before.float()).norm() / before.float().norm())


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_training_continues_from_the_warmup(tiny_llama, tmp_path, adapter):
    cfg = continuing_config(tiny_llama, tmp_path, adapter=adapter)
    result = run_train(write_config(cfg, tmp_path / "config.yml"))
    logs = result.stdout + result.stderr
    run = tmp_path / "run"
    ranking = load_ranking(tmp_path / "ranking.json")
    kept = set(ranking.names[:21])
    search = read_json(tmp_path / "ranking.json")["search"]
    assert search["stage1"]["steps"] == WARMUP and search["stage1"]["continued_by_training"] is True

    # The warm-up's state became the run's checkpoint at its last step: kept modules only.
    handoff = run / f"checkpoint-{WARMUP}"
    assert adapter_modules(handoff) == kept
    assert read_json(handoff / "trainer_state.json")["global_step"] == WARMUP
    assert "the training continues from the warm-up's step 8" in logs

    # One step later the kept adapters are one small step from the warm-up's
    # weights, not from fresh ones (fresh A is random: its change would be ~1).
    warm = load_tensors(handoff / "adapter_model.safetensors")
    after = load_tensors(run / "checkpoint-9" / "adapter_model.safetensors")
    assert set(after) == set(warm)
    for key in warm:
        assert relative_change(after[key], warm[key]) < 0.2, key
    assert all(float(warm[k].abs().max()) > 0 for k in warm if ".lora_B." in k)  # B moved off zero

    # After the switch the optimizer holds state for the kept adapters only (A and B
    # of 21 modules), as in a run with a cached ranking.
    for checkpoint in (handoff, run / "checkpoint-9"):
        optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        assert len(optimizer["state"]) == 2 * len(kept)
        assert sum(len(group["params"]) for group in optimizer["param_groups"]) == 2 * len(kept)

    # The whole run has the planned number of steps, and the saved adapter holds the kept modules only.
    final_state = read_json(run / "checkpoint-20" / "trainer_state.json")
    assert final_state["global_step"] == 20 and final_state["max_steps"] == 20
    logged_steps = [entry["step"] for entry in final_state["log_history"] if "loss" in entry]
    assert logged_steps == list(range(1, 21))  # warm-up steps 1-8, then 9-20
    assert adapter_modules(run) == kept
    assert set(read_json(run / "ila_selection.json")["kept"]) == kept


def test_two_runs_on_request_train_from_fresh_adapters(tiny_llama, tmp_path):
    cfg = continuing_config(tiny_llama, tmp_path, ila_continue=False)
    result = run_train(write_config(cfg, tmp_path / "config.yml"))
    run = tmp_path / "run"
    assert "continues from the warm-up" not in result.stdout + result.stderr
    assert not (run / f"checkpoint-{WARMUP}").exists()
    assert read_json(run / "checkpoint-9" / "trainer_state.json")["global_step"] == 9
    search = read_json(tmp_path / "ranking.json")["search"]
    assert search["stage1"]["continued_by_training"] is False
    assert adapter_modules(run) == set(load_ranking(tmp_path / "ranking.json").names[:21])


def test_a_run_that_searched_resumes_with_its_recorded_selection(tiny_llama, tmp_path):
    cfg = continuing_config(tiny_llama, tmp_path, auto_resume_from_checkpoints=True)
    run_train(write_config(cfg, tmp_path / "first.yml"))
    run = tmp_path / "run"
    kept = adapter_modules(run)
    record = (run / "ila_selection.json").read_bytes()
    # The ranking is gone: a fresh run would search again; a resumed one must not.
    (tmp_path / "ranking.json").unlink()
    result = run_train(write_config({**cfg, "max_steps": 24}, tmp_path / "resume.yml"))
    logs = result.stdout + result.stderr
    assert "ILA: resuming with the selection recorded" in logs
    assert "ILA search: warm-up" not in logs
    assert not (tmp_path / "ranking.json").exists()
    assert (run / "ila_selection.json").read_bytes() == record
    assert read_json(run / "checkpoint-24" / "trainer_state.json")["global_step"] == 24
    assert adapter_modules(run) == kept


MISMATCH = "do not match the ones in the `trainer_state.json`"


def no_checkpoints_config(workspace, out, **overrides):
    """Continuing from the warm-up, logging every 5 steps (the warm-up logs every
    step), saving no checkpoints of its own."""
    cfg = continuing_config(workspace, out, logging_steps=5, **overrides)
    cfg["save_strategy"] = "no"
    del cfg["save_steps"]
    return cfg


def test_without_checkpoints_the_run_continues_quietly_and_removes_the_warmup_checkpoint(tiny_llama, tmp_path):
    cfg = no_checkpoints_config(tiny_llama, tmp_path)
    result = run_train(write_config(cfg, tmp_path / "config.yml"))
    logs = result.stdout + result.stderr
    run = tmp_path / "run"
    assert "the training continues from the warm-up's step 8" in logs
    # The handover checkpoint carried the training's own intervals: no warning on loading it.
    assert MISMATCH not in logs
    # Once the training finished, nothing resumes from it: it is gone, and the log says why.
    assert not (run / f"checkpoint-{WARMUP}").exists()
    assert not list(run.glob("checkpoint-*"))
    assert f"removed the warm-up's checkpoint {run / f'checkpoint-{WARMUP}'}" in logs
    assert adapter_modules(run) == set(load_ranking(tmp_path / "ranking.json").names[:21])


def test_a_run_killed_after_the_handover_resumes_from_the_warmup_checkpoint_then_removes_it(tiny_llama, tmp_path):
    cfg = no_checkpoints_config(tiny_llama, tmp_path, auto_resume_from_checkpoints=True)
    cfg["max_steps"] = 60  # far more than the few seconds between the handover and the kill
    config = write_config(cfg, tmp_path / "config.yml")
    run = tmp_path / "run"
    handoff = run / f"checkpoint-{WARMUP}"
    log = tmp_path / "first.log"
    env = {**os.environ, **TEST_ENV}
    with open(log, "w") as handle:
        first = subprocess.Popen([sys.executable, "-m", "axolotl.cli.train", str(config)], stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        deadline = time.time() + 600
        while "the training continues from the warm-up's step" not in log.read_text() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        first.kill()
        first.wait(timeout=60)
    assert "the training continues from the warm-up's step 8" in log.read_text(), log.read_text()[-4000:]
    assert not (run / "adapter_model.safetensors").exists()  # killed before the end
    # Killed mid-run: the warm-up checkpoint is what a resumed run needs, so it stays.
    assert (handoff / "ila_handoff.json").exists()

    result = run_train(config)
    logs = result.stdout + result.stderr
    assert "ILA: resuming with the selection recorded" in logs
    assert "ILA search: warm-up" not in logs
    assert MISMATCH not in logs
    assert not handoff.exists()
    assert adapter_modules(run) == set(load_ranking(tmp_path / "ranking.json").names[:21])
