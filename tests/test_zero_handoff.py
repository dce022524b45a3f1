"""The wrap of transformers' DeepSpeed resume (``zero_handoff.install_resume``):
it takes ILA's warm-up checkpoints only and hands every other path to the
original. The handover itself runs for real in test_deepspeed.py."""

from __future__ import annotations

import json

import pytest

from axolotl_ila.handoff import zero as zero_handoff


@pytest.fixture
def recorded(monkeypatch):
    """transformers' resume call replaced by a recorder, then wrapped."""
    import transformers.trainer as hf_trainer

    calls = []

    def original(engine, path, load_module_strict=True):
        calls.append((engine, path, load_module_strict))
        return "original"

    monkeypatch.setattr(hf_trainer, "deepspeed_load_checkpoint", original)
    zero_handoff.install_resume()
    zero_handoff.install_resume()  # idempotent: wrapped once
    wrapped = hf_trainer.deepspeed_load_checkpoint
    assert wrapped is not original and wrapped.__wrapped__ is original
    return wrapped, calls


def test_deepspeeds_own_checkpoints_go_to_the_original(recorded, tmp_path):
    wrapped, calls = recorded
    (tmp_path / "global_step8").mkdir()
    assert wrapped("engine", str(tmp_path), load_module_strict=False) == "original"
    assert calls == [("engine", str(tmp_path), False)]


def test_a_warmup_checkpoint_is_applied_not_passed_on(recorded, tmp_path, monkeypatch):
    wrapped, calls = recorded
    (tmp_path / zero_handoff.HANDOFF_NAME).write_text(json.dumps({"step": 6}), encoding="utf-8")
    (tmp_path / zero_handoff.ZERO_STATE_FILE).write_bytes(b"")
    applied = []
    monkeypatch.setattr(zero_handoff, "apply", lambda engine, path: applied.append((engine, path)))
    wrapped("engine", str(tmp_path))
    assert applied == [("engine", str(tmp_path))] and calls == []


def test_a_warmup_checkpoint_written_without_deepspeed_is_refused(recorded, tmp_path):
    wrapped, calls = recorded
    (tmp_path / zero_handoff.HANDOFF_NAME).write_text(json.dumps({"step": 6}), encoding="utf-8")
    (tmp_path / "optimizer.pt").write_bytes(b"")
    with pytest.raises(zero_handoff.ZeroHandoffError, match="written without DeepSpeed; a DeepSpeed run cannot resume from it"):
        wrapped("engine", str(tmp_path))
    assert calls == []
