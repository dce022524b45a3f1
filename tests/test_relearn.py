"""The re-learning check: which modules it keeps open, how the closed ones are
ranked after the others, and that the warm-up's LoRA weights come back."""

from __future__ import annotations

import pytest
from helpers import ranking_with_search, search_stage, tiny_lora_trainer

from axolotl_ila.search.relearn import demote, lora_restored, open_share


def test_the_open_share_is_the_top_budget_fraction_by_score_ties_in_module_order():
    scores = {"a": 0.1, "b": 2.0, "c": -1.0, "d": 0.1, "e": 0.5}
    assert open_share(scores, 0.5) == {"b", "e"}  # floor(2.5)
    assert open_share(scores, 0.6) == {"b", "e", "a"}  # a before d: module order breaks the tie
    assert open_share(scores, 0.01) == {"b"}  # at least one


def test_closed_modules_rank_after_every_kept_one_each_group_in_gate_order():
    gates = {"o0": 5.3, "g5": 1.8, "mlp0": 1.3, "up0": 1.0, "k3": 0.38, "d5": 0.07, "q1": -0.2}
    scores, shift = demote(gates, kept={"o0", "g5", "k3", "d5"})
    order = sorted(scores, key=lambda n: -scores[n])
    assert order == ["o0", "g5", "k3", "d5", "mlp0", "up0", "q1"]
    assert shift == pytest.approx(1.3 - 0.07 + 1.0)
    assert {n: scores[n] for n in ("o0", "g5", "k3", "d5")} == {n: gates[n] for n in ("o0", "g5", "k3", "d5")}
    assert all(scores[n] == pytest.approx(gates[n] - shift) for n in ("mlp0", "up0", "q1"))


def test_nothing_moves_when_the_closed_modules_already_rank_last_or_none_are_closed():
    gates = {"a": 3.0, "b": 2.0, "c": -1.0}
    assert demote(gates, kept={"a", "b"}) == (gates, 0.0)
    assert demote(gates, kept={"a", "b", "c"}) == (gates, 0.0)


def test_lora_weights_are_put_back_after_the_check_trained_them(tmp_path):
    import torch

    from axolotl_ila.search.gates import run_gates

    trainer, layers = tiny_lora_trainer(tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    with lora_restored(layers):
        run_gates(trainer, layers, max_steps=4, lr=0.05, budget=0.5, agreement=0.99, min_steps=4, lora_lr=1e-2)
        moved = [n for n, p in trainer.model.named_parameters() if "lora_" in n and not torch.equal(p.detach(), before[n])]
        assert len(moved) == len(before)  # the check trained every LoRA matrix
    after = {n: p.detach() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_show_says_what_the_check_did_or_why_it_did_not_run(tmp_path, capsys):
    import json

    from axolotl_ila.cli.commands import main

    done = {"steps": 32, "stop_reason": "fixed length", "closed": ["model.layers.0.mlp.a", "model.layers.0.mlp.b"], "shift": 1.5}
    for relearn, expected in [
        (done, "relearn   32 steps with LoRA learning; 2 modules closed (their work, others' LoRA can learn) are ranked after the rest"),
        ({**done, "shift": 0.0}, "none ranked above a kept one, so the order is the gates' own"),
        ({"steps": 0, "why_not": "off by default under DeepSpeed"}, "relearn   no re-learning check (off by default under DeepSpeed)"),
    ]:
        path = ranking_with_search(tmp_path, {"method": "ila", "stage1": search_stage("settled", 0.95, 0.95), "stage2": search_stage("settled", 0.99, 1.0), "relearn": relearn})
        assert main(["show", str(path)]) == 0
        assert expected in capsys.readouterr().out
        assert main(["show", str(path), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["search"]["relearn"] == relearn
