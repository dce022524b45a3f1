"""How sure a ranking is: the certainty summary, the plain warnings, and what
``axolotl-ila show`` prints for a settled and an unsettled ranking."""

from __future__ import annotations

import json

from helpers import ranking_with_search, search_stage, tiny_lora_trainer

from axolotl_ila.cli.commands import main
from axolotl_ila.search.certainty import certainty, certainty_figures, certainty_warnings, stage_certainty


def test_a_stage_is_settled_by_its_last_comparison_not_by_why_it_stopped():
    assert stage_certainty(search_stage("settled", 0.95, 0.93))["settled"]
    assert stage_certainty(search_stage("cap", 0.97, 0.95))["settled"]  # ran to its cap, but the order held still
    assert not stage_certainty(search_stage("cap", 0.97, 0.81))["settled"]  # the top set still changing
    assert not stage_certainty(search_stage("cap", 0.6, 0.95))["settled"]
    assert not stage_certainty(search_stage("cap", None, None, steps=3))["settled"]  # never compared


def test_only_the_gates_warn_and_the_warmup_figures_are_information():
    search = {"stage1": {**search_stage("cap", 0.88, 0.74, 50, 50), "planned_training_steps": 200}, "stage2": search_stage("settled", 0.99, 1.0, 16, 128)}
    summary = certainty(search)
    assert summary["settled"] is False
    assert summary["warmup"]["settled"] is False and summary["gates"]["settled"] is True
    assert summary["warmup"]["last_top75_jaccard"] == 0.74 and summary["warmup"]["compared_steps"] == [25, 50]
    assert certainty_warnings(search) == []  # the warm-up's verdict predicts nothing on the planted suite
    warmup, gates = certainty_figures(search)
    assert warmup == "warm-up: 50/50 steps (cap), order at step 50 against step 25: rank correlation 0.88, top-75% Jaccard 0.74: still moving"
    assert gates.startswith("gates: 16/128 steps (settled)") and gates.endswith(": settled")

    unsettled_gates = {"stage1": search_stage("settled", 0.95, 0.95), "stage2": search_stage("cap", 0.5, 0.6, 128, 128)}
    (warning,) = certainty_warnings(unsettled_gates)
    assert "gates had not settled" in warning and "ila_gate_steps" in warning and "Jaccard 0.60" in warning

    assert certainty_warnings({"stage1": search_stage("settled", 0.95, 0.95), "stage2": search_stage("cap", 0.95, 0.95)}) == []
    assert certainty_warnings({"method": "combine"}) == [] and certainty_figures({"method": "combine"}) == []


def test_show_gives_the_warmup_figures_without_a_warning(tmp_path, capsys):
    path = ranking_with_search(tmp_path, {"method": "ila", "stage1": search_stage("cap", 0.8, 0.7), "stage2": search_stage("settled", 0.99, 1.0)})
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "certainty warm-up: 50/50 steps (cap), order at step 50 against step 25: rank correlation 0.80, top-75% Jaccard 0.70: still moving" in out
    assert "WARNING" not in out and "ila_warmup_fraction" not in out
    assert main(["show", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["certainty"]["settled"] is False and data["certainty"]["warmup"]["stop_reason"] == "cap"


def test_show_warns_when_the_gates_had_not_settled(tmp_path, capsys):
    path = ranking_with_search(tmp_path, {"method": "ila", "stage1": search_stage("settled", 0.95, 0.95), "stage2": search_stage("cap", 0.5, 0.6, 128, 128)})
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: this ranking's gates had not settled" in out and "ila_gate_steps" in out


def test_gates_with_lora_learning_change_the_lora_weights_and_frozen_gates_do_not(tmp_path):
    import torch

    from axolotl_ila.search.gates import run_gates

    for lora_lr in (None, 1e-2):
        trainer, layers = tiny_lora_trainer(tmp_path / str(lora_lr))
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        scores, record = run_gates(trainer, layers, max_steps=6, lr=0.05, budget=0.3, agreement=0.99, min_steps=6, lora_lr=lora_lr)
        after = dict(trainer.model.named_parameters())
        changed = [n for n, p in before.items() if not torch.equal(p, after[n].detach())]
        assert set(scores) == set(layers) and record["steps"] == 6 and record["lora_learning_rate"] == lora_lr
        assert record["mean_gate"] <= 0.3 + 1e-6
        if lora_lr is None:
            assert changed == []  # the paper's stage 2: LoRA frozen
        else:
            assert len(changed) == len(before)  # every LoRA matrix learned beside the gates
