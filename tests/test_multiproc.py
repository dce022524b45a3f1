"""Two real processes (gloo, CPU) through axolotl's own train entry point.

Each launch starts two ranks of ``tests/multiproc_train.py``, a test-only wrapper
around ``axolotl.cli.train`` that only moves the model to the CPU (see its
docstring): one through ``torchrun --nproc_per_node 2``, one through ``accelerate
launch``, the others forked from a process with axolotl's stack imported, with
the environment torchrun gives its ranks (``launch``). Every rank writes a report
(what it planned, which ranking it read, what its trainer trains); the tests check
those, the files written and the logs. A launch that outlives its timeout is
killed and fails the test, so a hang cannot pass.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    FSDP2,
    FULL_FT,
    MULTIPROC_SETTINGS,
    WORLD_SIZE,
    adapter_modules,
    check,
    check_full_finetuning,
    check_resumed_from_the_ranking,
    check_sharded,
    equal_label_datasets,
    kept_and_dropped,
    killed_then_resumed,
    launch,
    load_tensors,
    log_lines,
    make_config,
    mentions,
    read_json,
    run_train,
    write_config,
)

from axolotl_ila.ranking.file import file_digest, load_ranking

pytestmark = [pytest.mark.e2e, pytest.mark.multiproc]


@pytest.fixture(scope="module")
def two_ranks(tiny_llama, tmp_path_factory) -> dict:
    """No ranking present: both ranks search, then train LoRA under DDP;
    started by torchrun.

    ``curriculum_sampling`` (sequential order, no shuffle) makes the data order
    reproducible by a one-process run for the averaging test: rank 0 takes
    micro-batch 0, rank 1 micro-batch 1, exactly the two micro-batches one process
    sees in one step with ``gradient_accumulation_steps: 2``. Every row has the
    same number of label tokens (``equal_label_datasets``).
    """
    out = tmp_path_factory.mktemp("two-ranks")
    ranking = out / "rankings" / "tiny-llama.json"
    cfg = make_config(tiny_llama, out, ila_ranking=str(ranking), curriculum_sampling=True, **MULTIPROC_SETTINGS,
                      datasets=equal_label_datasets(tiny_llama, out))
    run = check(launch(write_config(cfg, out / "config.yml"), launcher="torchrun"))
    return {"out": out, "ranking": ranking, "run": run, "cfg": cfg}


def test_every_rank_searches_and_only_the_main_process_writes(two_ranks):
    run = two_ranks["run"]
    assert mentions(run.logs, "ILA search: warm-up") == WORLD_SIZE
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
    assert mentions(run.logs, f"the training continues from the warm-up's step {warmup} ") == WORLD_SIZE
    assert "do not match the ones in the `trainer_state.json`" not in run.logs
    assert mentions(run.logs, f"removed the warm-up's checkpoint {two_ranks['out'] / 'run' / f'checkpoint-{warmup}'}") == 1
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
    # So does the re-learning check, whose LoRA steps take the rank-averaged gradients too.
    assert two.search["relearn"]["steps"] == 32 and two.search["relearn"]["closed"] == one.search["relearn"]["closed"]
    for name, score in two.search["relearn"]["scores"].items():
        assert score == pytest.approx(one.search["relearn"]["scores"][name], abs=1e-4), name


def test_full_finetuning_under_ddp_searches_and_freezes_exactly_the_dropped_weights(tiny_llama, tmp_path):
    """Started by `accelerate launch --multi_gpu` (as users do), not torchrun."""
    ranking = tmp_path / "ranking.json"
    cfg = make_config(tiny_llama, tmp_path, adapter=None, ila_ranking=str(ranking), **FULL_FT)
    _, resumed = killed_then_resumed(write_config(cfg, tmp_path / "config.yml"), 2, launcher="accelerate")
    check(resumed)
    check_resumed_from_the_ranking(resumed, ranking, 4)
    check_full_finetuning(resumed, ranking, tiny_llama, tmp_path / "run")


def test_qlora_under_ddp_searches_continues_and_resumes_with_its_recorded_selection(tiny_llama, tmp_path):
    """Searched, continued from the warm-up, killed after checkpoint 8; the
    ranking file is then deleted, so the resumed run can take its selection
    only from the record (ila_selection.json)."""
    ranking = tmp_path / "ranking.json"
    cfg = make_config(tiny_llama, tmp_path, adapter="qlora", ila_ranking=str(ranking), **MULTIPROC_SETTINGS,
                      save_strategy="steps", save_steps=8, auto_resume_from_checkpoints=True)
    config = write_config(cfg, tmp_path / "config.yml")
    killed = launch(config, ILA_TEST_KILL_AFTER_SAVE="8")  # every rank dies by SIGKILL after checkpoint-8
    assert killed.returncode != 0 and not killed.reports, killed.logs[-4000:]
    assert mentions(killed.logs, "ILA search: warm-up") == WORLD_SIZE
    assert len(log_lines(killed.logs, "ILA: wrote ranking")) == 1
    warmup = load_ranking(ranking).search["stage1"]["steps"]
    assert mentions(killed.logs, f"the training continues from the warm-up's step {warmup} ") == WORLD_SIZE
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == sorted([f"checkpoint-{warmup}", "checkpoint-8"])
    kept = set(load_ranking(ranking).names[:21])
    record = read_json(run_dir / "ila_selection.json")
    assert set(record["kept"]) == kept

    ranking.unlink()
    resumed = check(launch(config))
    assert mentions(resumed.logs, "ILA: resuming with the selection recorded in") == WORLD_SIZE
    assert not log_lines(resumed.logs, "ILA search: warm-up")
    for rank in (0, 1):
        assert resumed.reports[rank]["global_step"] == cfg["max_steps"]
        assert resumed.reports[rank]["four_bit_linears"] == 28  # the base stays 4-bit, dropped modules included
        assert set(resumed.reports[rank]["adapted"]) == kept
    assert read_json(run_dir / "ila_selection.json") == record
    assert (run_dir / f"checkpoint-{cfg['max_steps']}").is_dir()
    assert adapter_modules(run_dir / f"checkpoint-{warmup}") == kept
    assert adapter_modules(run_dir) == kept


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


# -- FSDP2: the same runs, sharded ----------------------------------------------------


@pytest.fixture(scope="module")
def fsdp2_lora(two_ranks, tmp_path_factory) -> dict:
    """``two_ranks`` again under FSDP2 (same config, data order and steps): it
    searches, continues from the warm-up, is killed after checkpoint 8, and
    resumes to step 10."""
    out = tmp_path_factory.mktemp("fsdp2-lora")
    ranking = out / "rankings" / "tiny-llama.json"
    cfg = {**two_ranks["cfg"], **FSDP2, "ila_ranking": str(ranking), "output_dir": str(out / "run"),
           "save_strategy": "steps", "save_steps": 8, "auto_resume_from_checkpoints": True}
    killed, resumed = killed_then_resumed(write_config(cfg, out / "config.yml"), 8)
    check_sharded(resumed)
    return {"out": out, "ranking": ranking, "killed": killed, "resumed": resumed, "cfg": cfg}


def test_fsdp2_search_ranks_as_ddp_does_and_one_process_writes(fsdp2_lora, two_ranks):
    """Gates on sharded LoRA weights, rank-averaged: the scores of the DDP search
    of the same global batches, up to float summation order."""
    # killed_then_resumed checked: both ranks searched, exactly one wrote.
    fsdp, ddp = load_ranking(fsdp2_lora["ranking"]), load_ranking(two_ranks["ranking"])
    assert fsdp.search["world_size"] == WORLD_SIZE
    assert fsdp.names == ddp.names
    ddp_scores = {m.name: (m.score, m.update_norm) for m in ddp.modules}
    for module in fsdp.modules:
        score, norm = ddp_scores[module.name]
        assert module.score == pytest.approx(score, abs=1e-4), module.name
        assert module.update_norm == pytest.approx(norm, rel=1e-4), module.name
    # The re-learning check steps the sharded LoRA weights on FSDP2's averaged gradient shards.
    assert fsdp.search["relearn"]["steps"] == 32 and fsdp.search["relearn"]["closed"] == ddp.search["relearn"]["closed"]
    for name, score in fsdp.search["relearn"]["scores"].items():
        assert score == pytest.approx(ddp.search["relearn"]["scores"][name], abs=1e-4), name


def test_fsdp2_training_continues_from_the_sharded_warmup_and_resumes(fsdp2_lora, two_ranks):
    out, killed, resumed = fsdp2_lora["out"], fsdp2_lora["killed"], fsdp2_lora["resumed"]
    kept, _ = kept_and_dropped(fsdp2_lora["ranking"])
    warmup = load_ranking(fsdp2_lora["ranking"]).search["stage1"]["steps"]
    assert mentions(killed.logs, f"the training continues from the warm-up's step {warmup} ") == WORLD_SIZE
    # The handover is a checkpoint in the engine's own sharded layout, kept modules only.
    handoff = out / "run" / f"checkpoint-{warmup}"
    assert (handoff / "pytorch_model_fsdp_0" / ".metadata").is_file()
    assert (handoff / "optimizer_0" / ".metadata").is_file()
    assert adapter_modules(handoff) == kept
    assert set(read_json(handoff / "ila_handoff.json")["kept"]) == kept
    # Resumed after the kill from checkpoint 8 (not the warm-up's), with the ranking's selection.
    check_resumed_from_the_ranking(resumed, fsdp2_lora["ranking"], fsdp2_lora["cfg"]["max_steps"])
    for rank in (0, 1):
        assert set(resumed.reports[rank]["adapted"]) == kept
    assert adapter_modules(out / "run") == kept
    # Warm-up, handover (weights and AdamW moments), kill and resume on shards end
    # where the uninterrupted DDP run of the same batches ended.
    sharded = load_tensors(out / "run" / "adapter_model.safetensors")
    ddp = load_tensors(two_ranks["out"] / "run" / "adapter_model.safetensors")
    assert sharded.keys() == ddp.keys()
    for key, tensor in ddp.items():
        assert torch.allclose(sharded[key], tensor, rtol=1e-3, atol=1e-5), key


def test_fsdp2_qlora_searches_continues_and_resumes(tiny_llama, tmp_path):
    ranking = tmp_path / "ranking.json"
    cfg = make_config(tiny_llama, tmp_path, adapter="qlora", ila_ranking=str(ranking), **FSDP2, **MULTIPROC_SETTINGS,
                      save_strategy="steps", save_steps=8, auto_resume_from_checkpoints=True)
    killed, resumed = killed_then_resumed(write_config(cfg, tmp_path / "config.yml"), 8)
    check_sharded(resumed)
    kept, _ = kept_and_dropped(ranking)
    warmup = load_ranking(ranking).search["stage1"]["steps"]
    assert mentions(killed.logs, f"the training continues from the warm-up's step {warmup} ") == WORLD_SIZE
    assert (tmp_path / "run" / f"checkpoint-{warmup}" / "optimizer_0" / ".metadata").is_file()
    check_resumed_from_the_ranking(resumed, ranking, cfg["max_steps"])
    for rank in (0, 1):
        assert resumed.reports[rank]["four_bit_linears"] == 28  # the base stays 4-bit, dropped modules included
        assert set(resumed.reports[rank]["adapted"]) == kept
    assert adapter_modules(tmp_path / "run") == kept


def test_fsdp2_full_finetuning_searches_then_freezes_exactly_the_dropped_weights(tiny_llama, tmp_path):
    """Per-parameter sharding lets frozen and trainable weights share a block.
    FULL_STATE_DICT: the final model is saved whole (model.safetensors)."""
    ranking = tmp_path / "ranking.json"
    fsdp = {**FSDP2, "fsdp_config": {**FSDP2["fsdp_config"], "state_dict_type": "FULL_STATE_DICT"}}
    cfg = make_config(tiny_llama, tmp_path, adapter=None, ila_ranking=str(ranking), **fsdp, **FULL_FT)
    killed, resumed = killed_then_resumed(write_config(cfg, tmp_path / "config.yml"), 2)
    check_sharded(resumed, wrapped="FSDPLlamaForCausalLM")
    assert not log_lines(killed.logs, "the training continues from the warm-up")  # full fine-tuning trains afresh
    check_resumed_from_the_ranking(resumed, ranking, 4)
    check_full_finetuning(resumed, ranking, tiny_llama, tmp_path / "run")
