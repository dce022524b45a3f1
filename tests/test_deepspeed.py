"""DeepSpeed ZeRO-2 and ZeRO-3 in two real CPU processes (gloo), through axolotl's
own train entry point and the test-only wrapper ``tests/multiproc_train.py`` (see
test_multiproc.py for the launch and the reports each rank writes).

A file of its own, so that pytest-xdist (``--dist loadfile``) runs it beside
test_multiproc.py. What is checked: the search under ZeRO-2 and ZeRO-3 (on
partitioned LoRA weights) gives the scores of a one-process search of the same
global batches; the training has adapters exactly on the kept modules on every
rank (LoRA; QLoRA, its 4-bit base kept) or freezes exactly the dropped weights
(full fine-tuning); LoRA and QLoRA training continues from the warm-up (the
one-run continuation), LoRA's ending where a one-process run of the same
batches ends; a run killed after a DeepSpeed checkpoint resumes from it with
the ranking's selection.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    FULL_FT,
    MULTIPROC_SETTINGS,
    WORLD_SIZE,
    adapter_modules,
    check,
    check_full_finetuning,
    check_resumed_from_the_ranking,
    equal_label_datasets,
    kept_and_dropped,
    killed_then_resumed,
    load_tensors,
    log_lines,
    make_config,
    mentions,
    read_json,
    run_train,
    write_config,
)

from axolotl_ila.handoff.state import lora_module_of
from axolotl_ila.ranking.file import load_ranking

pytestmark = [pytest.mark.e2e, pytest.mark.multiproc]

# As axolotl's deepspeed_configs/zero2.json and zero3.json set them (fp32 here, on
# CPU). ZeRO-3 keeps parameters under 100k elements whole on every rank by default
# (stage3_param_persistence_threshold); 0 partitions every weight of the tiny model,
# as ZeRO-3 partitions a large model's.
ZERO = {
    2: {"stage": 2},
    3: {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": True},
}
# accelerate starts DeepSpeed only on ranks it does not treat as CPU ranks
# (the DDP and FSDP2 launches set ACCELERATE_USE_CPU=true).
DEEPSPEED_ENV = {"ACCELERATE_USE_CPU": "false"}


def deepspeed_config(stage: int, folder: Path) -> Path:
    path = folder / f"zero{stage}.json"
    block = {"zero_optimization": ZERO[stage], "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
             "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
             "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}
    path.write_text(json.dumps(block), encoding="utf-8")
    return path


def check_deepspeed(run, stage: int):
    check(run, wrapped="DeepSpeedEngine")
    for report in run.reports.values():
        assert report["zero_stage"] == stage
        # ZeRO-3: each rank holds only its partition of every trainable weight.
        assert report["zero3_partitioned_trainable"] == (report["trainable"] if stage == 3 else [])
    return run


@pytest.fixture(scope="module")
def lora_cfg(tiny_llama, tmp_path_factory) -> dict:
    """test_multiproc's ``two_ranks`` config: sequential data order (rank 0 takes
    micro-batch 0, rank 1 micro-batch 1), rows of equal label counts
    (``equal_label_datasets``)."""
    out = tmp_path_factory.mktemp("deepspeed-lora")
    return make_config(tiny_llama, out, ila_ranking=str(out / "unused.json"), curriculum_sampling=True, **MULTIPROC_SETTINGS,
                       datasets=equal_label_datasets(tiny_llama, out))


@pytest.fixture(scope="module")
def one_process_ranking(lora_cfg, tmp_path_factory) -> Path:
    """The same global batches in one process: 4 rows x 2 accumulation steps;
    the training continues from the warm-up, its adapter in ``run/`` beside.
    Without the re-learning check, as DeepSpeed searches by default."""
    out = tmp_path_factory.mktemp("one-process")
    ranking = out / "ranking.json"
    cfg = {**lora_cfg, "ila_ranking": str(ranking), "gradient_accumulation_steps": 2, "ila_relearn_steps": 0,
           "output_dir": str(out / "run"), "dataset_prepared_path": str(out / "prepared")}
    run_train(write_config(cfg, out / "config.yml"))
    return ranking


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_lora_searches_continues_from_the_warmup_and_resumes(stage, lora_cfg, one_process_ranking, tmp_path):
    """Both ranks search (ZeRO-3: on partitioned LoRA weights), one writes; the
    training continues from the warm-up (ila_continue's default) with adapters
    on the kept modules only, its engine given the warm-up's fp32 weights and
    AdamW moments per parameter (zero_handoff); it is killed after DeepSpeed's
    checkpoint 8 and resumes from it with the ranking's selection. Its final
    adapter is the one-process run's of the same global batches."""
    ranking = tmp_path / "rankings" / "tiny-llama.json"
    cfg = {**lora_cfg, "deepspeed": str(deepspeed_config(stage, tmp_path)), "ila_ranking": str(ranking),
           "output_dir": str(tmp_path / "run"), "save_strategy": "steps", "save_steps": 8,
           "auto_resume_from_checkpoints": True}
    killed, resumed = killed_then_resumed(write_config(cfg, tmp_path / "config.yml"), 8, **DEEPSPEED_ENV)
    check_deepspeed(resumed, stage)
    kept, _ = kept_and_dropped(ranking)
    for rank in (0, 1):
        assert set(resumed.reports[rank]["adapted"]) == kept
        assert len(resumed.reports[rank]["trainable"]) == 2 * len(kept)  # lora_A and lora_B of each kept module
    # Rank-averaged gates on (partitioned) LoRA weights: the scores and update
    # norms of one process fed the same global batches, and the same order.
    ds, one = load_ranking(ranking), load_ranking(one_process_ranking)
    assert ds.search["world_size"] == WORLD_SIZE and one.search["world_size"] == 1
    assert ds.names == one.names
    assert ds.search["relearn"] == {"steps": 0, "why_not": "off by default under DeepSpeed"}
    reference = {m.name: (m.score, m.update_norm) for m in one.modules}
    assert max(abs(m.score) for m in ds.modules) > 0.05  # the gates did move
    for module in ds.modules:
        score, norm = reference[module.name]
        assert module.score == pytest.approx(score, abs=1e-4), module.name
        assert module.update_norm == pytest.approx(norm, rel=1e-4), module.name
    # The training continued from the warm-up on both ranks (each rank's
    # HandoffCheck read the engine's weights, moments and step counts back
    # before step one; a failure would have ended the run before checkpoint 8).
    warmup = ds.search["stage1"]["steps"]
    assert mentions(killed.logs, f"the training continues from the warm-up's step {warmup} ") == WORLD_SIZE
    run_dir = tmp_path / "run"
    handoff = run_dir / f"checkpoint-{warmup}"
    assert (handoff / "ila_zero_state.pt").is_file() and not list(handoff.glob("global_step*"))
    assert adapter_modules(handoff) == kept
    assert set(read_json(handoff / "ila_handoff.json")["kept"]) == kept
    zero_state = torch.load(handoff / "ila_zero_state.pt", weights_only=True)
    assert {lora_module_of(name) for name in zero_state["params"]} == kept
    assert zero_state["global_steps"] == warmup and float(zero_state["adam_step"]) == warmup
    # Resumed after the kill from DeepSpeed's own checkpoint 8 (named by the
    # trainer's step: the engine's step counter was handed over), to step 10.
    assert (run_dir / "checkpoint-8" / "global_step8").is_dir()
    check_resumed_from_the_ranking(resumed, ranking, cfg["max_steps"])
    assert set(read_json(run_dir / "ila_selection.json")["kept"]) == kept
    assert adapter_modules(run_dir / "checkpoint-8") == kept
    assert adapter_modules(run_dir) == kept
    saved = load_tensors(run_dir / "adapter_model.safetensors")
    assert all(t.numel() > 0 for t in saved.values())  # whole tensors, not ZeRO-3 partitions
    # Warm-up, handover (weights, AdamW moments, step), kill and resume under
    # ZeRO end where the uninterrupted one-process run of the same batches ended.
    one_process = load_tensors(one_process_ranking.parent / "run" / "adapter_model.safetensors")
    assert saved.keys() == one_process.keys()
    for key, tensor in one_process.items():
        assert torch.allclose(saved[key], tensor, rtol=1e-3, atol=1e-5), key


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_full_finetuning_searches_then_freezes_exactly_the_dropped_weights(stage, tiny_llama, tmp_path):
    ranking = tmp_path / "ranking.json"
    cfg = make_config(tiny_llama, tmp_path, adapter=None, ila_ranking=str(ranking), **FULL_FT,
                      deepspeed=str(deepspeed_config(stage, tmp_path)))
    killed, resumed = killed_then_resumed(write_config(cfg, tmp_path / "config.yml"), 2, **DEEPSPEED_ENV)
    check_deepspeed(resumed, stage)
    assert not log_lines(killed.logs, "the training continues from the warm-up")  # full fine-tuning trains afresh
    assert (tmp_path / "run" / "checkpoint-2" / "global_step2").is_dir()
    check_resumed_from_the_ranking(resumed, ranking, 4)
    check_full_finetuning(resumed, ranking, tiny_llama, tmp_path / "run")


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_qlora_searches_continues_from_the_warmup_and_resumes(stage, tiny_llama, tmp_path):
    """QLoRA: the 4-bit base stays 4-bit on both ranks (frozen, so outside
    ZeRO's optimizer; ZeRO-3 partitions the LoRA weights); the search, the
    continuation from the warm-up, the kill after checkpoint 8 and the resume
    with the ranking's selection run as with LoRA."""
    ranking = tmp_path / "ranking.json"
    cfg = make_config(tiny_llama, tmp_path, adapter="qlora", ila_ranking=str(ranking), **MULTIPROC_SETTINGS,
                      deepspeed=str(deepspeed_config(stage, tmp_path)), save_strategy="steps", save_steps=8,
                      auto_resume_from_checkpoints=True)
    killed, resumed = killed_then_resumed(write_config(cfg, tmp_path / "config.yml"), 8, **DEEPSPEED_ENV)
    check_deepspeed(resumed, stage)
    kept, _ = kept_and_dropped(ranking)
    warmup = load_ranking(ranking).search["stage1"]["steps"]
    assert mentions(killed.logs, f"the training continues from the warm-up's step {warmup} ") == WORLD_SIZE
    assert (tmp_path / "run" / f"checkpoint-{warmup}" / "ila_zero_state.pt").is_file()
    assert (tmp_path / "run" / "checkpoint-8" / "global_step8").is_dir()
    check_resumed_from_the_ranking(resumed, ranking, cfg["max_steps"])
    for rank in (0, 1):
        assert resumed.reports[rank]["four_bit_linears"] == 28  # the base stays 4-bit, dropped modules included
        assert set(resumed.reports[rank]["adapted"]) == kept
        assert len(resumed.reports[rank]["trainable"]) == 2 * len(kept)
    assert adapter_modules(tmp_path / "run") == kept
    saved = load_tensors(tmp_path / "run" / "adapter_model.safetensors")
    assert all(bool(t.abs().sum() > 0) for k, t in saved.items() if ".lora_B." in k)  # B starts at zero: all trained
