"""Two real processes (gloo, CPU) through axolotl's own train entry point.

Each launch is ``torchrun --nproc_per_node 2`` (or ``accelerate launch``) of
``tests/multiproc_train.py``, a test-only wrapper around ``axolotl.cli.train`` that
only moves the model to the CPU (see its docstring). Every rank writes a report
(what it planned, which ranking it read, what its trainer trains); the tests check
those, the files written and the logs. A launch that outlives its timeout is
killed and fails the test, so a hang cannot pass.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from axolotl_ila.ranking import file_digest, load_ranking
from conftest import adapter_modules, load_tensors, make_config, read_json, run_train, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.multiproc]

HARNESS = Path(__file__).with_name("multiproc_train.py")
WORLD_SIZE = 2
LAUNCH_TIMEOUT_S = 300
# What a two-rank run needs on a 2-core machine: one thread per process, one
# dataset worker, and a short search.
MULTIPROC_SETTINGS = {"dataset_processes": 1, "ila_gate_steps": 8, "ila_warmup_max_steps": 6, "max_steps": 10}


@dataclass
class Launch:
    returncode: int
    logs: str
    reports: dict[int, dict]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config: Path, launcher: str = "torchrun", monitor_s: int = 2, **env_extra: str) -> Launch:
    """Start two ranks on ``config``; wait at most LAUNCH_TIMEOUT_S."""
    reports = config.parent / f"reports-{config.stem}"
    shutil.rmtree(reports, ignore_errors=True)
    port = str(_free_port())
    env = {
        **os.environ,
        "AXOLOTL_DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        # Makes the HF trainer run the CPU ranks as one distributed (DDP) run, as
        # `accelerate launch --cpu` would; without it each rank trains alone.
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "ILA_TEST_REPORT_DIR": str(reports),
        **env_extra,
    }
    if launcher == "torchrun":
        # A rank that fails is reported within monitor_s; the other rank has
        # that long to reach (and report) its own error before it is stopped.
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD_SIZE}",
                   "--master_addr=127.0.0.1", f"--master_port={port}", f"--monitor_interval={monitor_s}"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={WORLD_SIZE}",
                   "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={port}"]
    process = subprocess.Popen(
        [*command, str(HARNESS), str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=config.parent,
        start_new_session=True,  # the ranks are in its process group: one kill ends them all
    )
    try:
        logs, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        logs, _ = process.communicate()
        pytest.fail(f"the two ranks did not finish within {LAUNCH_TIMEOUT_S} s (a rank hangs):\n{logs[-6000:]}")
    found = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in reports.glob("rank-*.json")}
    return Launch(process.returncode, logs, found)


def check(run: Launch) -> Launch:
    if run.returncode != 0:
        raise AssertionError(f"the two-rank run failed ({run.returncode}):\n{run.logs[-8000:]}")
    assert sorted(run.reports) == [0, 1], run.logs[-4000:]
    for report in run.reports.values():
        # Really one data-parallel run, not two processes training alone.
        assert report["parallel_mode"] == "ParallelMode.DISTRIBUTED" and report["world_size"] == WORLD_SIZE
        assert report["wrapped"] == "DistributedDataParallel"
    return run


def log_lines(logs: str, text: str) -> list[str]:
    return [line for line in logs.splitlines() if text in line]


@pytest.fixture(scope="module")
def two_ranks(tiny_llama, tmp_path_factory) -> dict:
    """No ranking present: both ranks search, then train LoRA under DDP.

    ``curriculum_sampling`` (sequential order, no shuffle) makes the data order
    reproducible by a one-process run for the averaging test: rank 0 takes
    micro-batch 0, rank 1 micro-batch 1, exactly the two micro-batches one process
    sees in one step with ``gradient_accumulation_steps: 2``.
    """
    out = tmp_path_factory.mktemp("two-ranks")
    ranking = out / "rankings" / "tiny-llama.json"
    cfg = make_config(tiny_llama, out, ila_ranking=str(ranking), curriculum_sampling=True, **MULTIPROC_SETTINGS)
    run = check(launch(write_config(cfg, out / "config.yml")))
    return {"out": out, "ranking": ranking, "run": run, "cfg": cfg}


def test_every_rank_searches_and_only_the_main_process_writes(two_ranks):
    run = two_ranks["run"]
    assert len(log_lines(run.logs, "ILA search: warm-up")) == WORLD_SIZE
    assert run.reports[0]["save_ranking_calls"] == 1 and run.reports[1]["save_ranking_calls"] == 0
    wrote = log_lines(run.logs, "ILA: wrote ranking")
    assert len(wrote) == 1 and "[RANK:" not in wrote[0], wrote
    assert load_ranking(two_ranks["ranking"]).search["world_size"] == WORLD_SIZE


def test_both_ranks_read_the_same_ranking_and_plan_the_same_selection(two_ranks):
    run = two_ranks["run"]
    digest = file_digest(two_ranks["ranking"])
    assert [run.reports[r]["ranking_digest"] for r in (0, 1)] == [digest, digest]
    record = read_json(two_ranks["out"] / "run" / "ila_selection.json")
    assert run.reports[0]["plan"] == run.reports[1]["plan"] == record
    assert record["ranking"]["digest"] == digest


def test_ddp_training_has_adapters_exactly_on_the_kept_modules(two_ranks):
    run = two_ranks["run"]
    ranking = load_ranking(two_ranks["ranking"])
    kept = set(ranking.names[:21])  # drop 25% of 28
    assert set(read_json(two_ranks["out"] / "run" / "ila_selection.json")["kept"]) == kept
    for rank in (0, 1):
        assert set(run.reports[rank]["adapted"]) == kept
        assert run.reports[rank]["global_step"] == two_ranks["cfg"]["max_steps"]
    assert adapter_modules(two_ranks["out"] / "run") == kept
    # Both ranks stopped the warm-up at the same step and continued from the one
    # checkpoint the main process wrote there (each rank's HandoffCheck compared its
    # kept adapters with it before step one), without transformers' warning about
    # its intervals; with save_strategy: no the main process removed it at the end.
    warmup = load_ranking(two_ranks["ranking"]).search["stage1"]["steps"]
    assert len(log_lines(run.logs, f"the training continues from the warm-up's step {warmup} ")) == WORLD_SIZE
    assert "do not match the ones in the `trainer_state.json`" not in run.logs
    assert len(log_lines(run.logs, f"removed the warm-up's checkpoint {two_ranks['out'] / 'run' / f'checkpoint-{warmup}'}")) == 1
    assert not (two_ranks["out"] / "run" / f"checkpoint-{warmup}").exists()


def test_two_process_gate_scores_equal_a_one_process_search_of_the_same_global_batch(two_ranks, tmp_path):
    """Rank-averaged gate gradients: 2 ranks x 4 rows give the scores of 1 process
    x 4 rows x 2 accumulation steps, fed the same rows (sequential order). Each
    micro-batch's loss is a mean over its own tokens in both, so they agree up to
    float summation order; a missing or wrong average would leave each rank
    following its own half of the batch."""
    ranking = tmp_path / "one-process.json"
    cfg = {**two_ranks["cfg"], "ila_ranking": str(ranking), "gradient_accumulation_steps": 2,
           "output_dir": str(tmp_path / "run"), "dataset_prepared_path": str(tmp_path / "prepared")}
    run_train(write_config(cfg, tmp_path / "config.yml"))
    one = load_ranking(ranking)
    two = load_ranking(two_ranks["ranking"])
    assert one.search["world_size"] == 1 and two.search["world_size"] == WORLD_SIZE
    scores_one = {m.name: m.score for m in one.modules}
    scores_two = {m.name: m.score for m in two.modules}
    assert max(abs(s) for s in scores_two.values()) > 0.05  # the gates did move
    for name, score in scores_two.items():
        assert score == pytest.approx(scores_one[name], abs=1e-4), name
    assert one.names == two.names
    # The warm-up (DDP vs gradient accumulation) agrees as well.
    norms_one = {m.name: m.update_norm for m in one.modules}
    for module in two.modules:
        assert module.update_norm == pytest.approx(norms_one[module.name], rel=1e-4), module.name


def test_full_finetuning_under_ddp_freezes_exactly_the_dropped_weights(two_ranks, tiny_llama, tmp_path):
    """Started by `accelerate launch --multi_gpu` (as users do), not torchrun."""
    ranking = load_ranking(two_ranks["ranking"])
    cfg = make_config(tiny_llama, tmp_path, adapter=None, ila_ranking=str(two_ranks["ranking"]), ila_search="never",
                      dataset_processes=1, max_steps=3, learning_rate=0.01)
    run = check(launch(write_config(cfg, tmp_path / "config.yml"), launcher="accelerate"))
    dropped, kept = ranking.names[-7:], ranking.names[:21]
    for rank in (0, 1):
        trainable = set(run.reports[rank]["trainable"])
        assert not any(f"{name}.weight" in trainable for name in dropped)
        assert all(f"{name}.weight" in trainable for name in kept)
    base = load_tensors(tiny_llama["model"] / "model.safetensors")
    tuned = load_tensors(tmp_path / "run" / "model.safetensors")
    for name in dropped:
        assert (tuned[f"{name}.weight"] == base[f"{name}.weight"]).all(), f"{name} changed but was dropped"
    for name in kept:
        assert not (tuned[f"{name}.weight"] == base[f"{name}.weight"]).all(), f"{name} did not train"
    assert not (tuned["model.embed_tokens.weight"] == base["model.embed_tokens.weight"]).all()


def test_a_killed_two_process_run_resumes_with_its_recorded_selection(two_ranks, tiny_llama, tmp_path):
    ranking = tmp_path / "ranking.json"
    shutil.copyfile(two_ranks["ranking"], ranking)
    cfg = make_config(tiny_llama, tmp_path, ila_ranking=str(ranking), dataset_processes=1, max_steps=6,
                      save_strategy="steps", save_steps=2, auto_resume_from_checkpoints=True)
    config = write_config(cfg, tmp_path / "config.yml")
    killed = launch(config, ILA_TEST_KILL_AFTER_SAVE="2")  # every rank dies by SIGKILL after checkpoint-2
    assert killed.returncode != 0 and not killed.reports
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    record = read_json(run_dir / "ila_selection.json")

    ranking.unlink()  # the resumed run can only take its selection from the record
    resumed = check(launch(config))
    assert len(log_lines(resumed.logs, "ILA: resuming with the selection recorded in")) == WORLD_SIZE
    assert not log_lines(resumed.logs, "ILA search: warm-up")
    for rank in (0, 1):
        assert set(resumed.reports[rank]["adapted"]) == set(record["kept"])
        assert resumed.reports[rank]["global_step"] == 6
    assert read_json(run_dir / "ila_selection.json") == record
    assert (run_dir / "checkpoint-6").is_dir()
    assert adapter_modules(run_dir) == set(record["kept"])


def test_a_bad_ranking_is_refused_on_every_rank(tiny_llama, tmp_path):
    ranking = tmp_path / "ranking.json"
    ranking.write_text("my notes\n", encoding="utf-8")
    cfg = make_config(tiny_llama, tmp_path, ila_ranking=str(ranking), ila_search="never", dataset_processes=1)
    run = launch(write_config(cfg, tmp_path / "config.yml"), monitor_s=10)
    assert run.returncode != 0
    assert sorted(run.reports) == [0, 1], run.logs[-4000:]
    for rank in (0, 1):
        assert f"ranking file {ranking}: is not valid JSON" in run.reports[rank]["error"], run.reports[rank]["error"][:2000]
    assert ranking.read_text(encoding="utf-8") == "my notes\n"
    assert not (tmp_path / "run" / "ila_selection.json").exists()


def test_a_failed_write_on_the_main_process_stops_every_rank(tiny_llama, tmp_path):
    ranking = tmp_path / "rankings" / "ranking.json"
    cfg = make_config(tiny_llama, tmp_path, ila_ranking=str(ranking), dataset_processes=1,
                      ila_gate_steps=2, ila_warmup_max_steps=2, max_steps=2)
    run = launch(write_config(cfg, tmp_path / "config.yml"), monitor_s=10, ILA_TEST_FAIL_WRITE="1")
    assert run.returncode != 0
    assert sorted(run.reports) == [0, 1], run.logs[-4000:]
    fallback = tmp_path / "run" / "ila_ranking.json"
    for rank in (0, 1):
        error = run.reports[rank]["error"]
        assert (
            f"ILA: the main process failed to write: RankingError: the search finished, but its ranking could "
            f"be written neither to ila_ranking {ranking}" in error
        ), error[:2000]
        assert f"nor to {fallback} (injected by the test" in error, error[:2000]
    # The main process tried ila_ranking, then the fallback under output_dir; the other rank wrote nothing.
    assert [run.reports[r]["save_ranking_calls"] for r in (0, 1)] == [2, 0]
    assert not ranking.exists() and not fallback.exists()
    assert not (tmp_path / "run" / "ila_selection.json").exists()
