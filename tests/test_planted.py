"""What the search's ranking buys on planted tasks, asserted as keep-k regret.

A planted task (``benchmarks/planted/tasks.py``) is a tiny base model whose teacher
adds low-rank deltas to a few modules; the data are the teacher's samples.
Its truth is measured: the held-out loss of LoRA on the planted modules,
trained for the task's planned steps. The search runs on the base exactly as
``axolotl-ila search`` runs it (a fresh process, every ``ila_`` key at its
default), and LoRA on its top k (k = the number of planted modules), trained
the same way, must come within a margin of that loss: the keep-k regret. The
planted modules are no answer key (another module can train better within the
steps), so the tests do not ask for them by name.

The tasks are tasks of the benchmark suite (``benchmarks/planted``, seeds 2, 15,
16 and 952): three families, short runs (150-250 planned steps), a long one
(400+) and one between. Each margin is the regret the suite measured for that
task at the default (0.000 for all four) plus 0.03, the target for the worst
task, so a change of the search that makes any of them clearly worse fails
here. Three of them fail other settings of the search: task 15 with the
warm-up at 0.5 of the run (``ila_w50`` in the suite: 0.054, it ranks a block-0
``down_proj`` above a planted block-1 module), task 16 with
``ila_warmup_early_stop: true`` and ``ila_gate_min_steps: 16`` (``ila_early16``:
the warm-up stops as settled at step 30 of 175 and the top 3 train 0.099
worse), and task 952, one of the examples of the issue that asked for the
suite, without the re-learning check (``ila_gates_only``: 0.036, block-0
modules that stand in for the unfinished planted ``o_proj`` outrank a planted
``k_proj``; docs/planted.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import run_python

from benchmarks.planted.run import task_for
from benchmarks.planted.tasks import PlantedTask, build_task, load_json, random_task, search_config, train_lora, write_config

# Suite seed -> the largest keep-k regret accepted: measured + 0.03.
CI_TASKS: dict[int, float] = {
    2: 0.0 + 0.03,  # llama, 2 blocks, 610 planned steps
    15: 0.0 + 0.03,  # qwen2 (q/k/v biases, grouped-query attention), 2 blocks, 150 steps
    16: 0.0 + 0.03,  # mistral (grouped-query attention), 5 blocks, 350 steps
    952: 0.0 + 0.03,  # qwen2, 6 blocks, 200 steps: the example (benchmarks.planted.run.ISSUE_TASKS)
}


def run_search(config: Path) -> None:
    code = f"from axolotl_ila.plugin import search_config_file; search_config_file({str(config)!r})"
    # One thread, as the suite measured: the same sums in the same order.
    result = run_python(["-c", code], cwd=config.parent, timeout=900, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-6000:]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def keep_k_regret(task: PlantedTask, root: Path) -> tuple[float, dict]:
    files = build_task(task, root / "task")
    ranking_path = root / "ranking.json"
    run_search(write_config(search_config(task, files, root, ranking_path), root / "search.yml"))
    ranking = load_json(ranking_path)
    top = [m["name"] for m in ranking["modules"]][: task.k]
    if set(top) == set(task.planted):
        # train_lora trains a set of modules in model order with the task's
        # seed: the same set gives the same loss, so the regret is exactly 0.
        return 0.0, ranking
    return train_lora(files, task, top) - train_lora(files, task, task.planted), ranking


@pytest.mark.e2e
@pytest.mark.parametrize("seed", sorted(CI_TASKS))
def test_the_search_top_k_trains_about_as_well_as_the_planted_set(seed, tmp_path, one_thread):
    task = task_for(seed)
    regret, ranking = keep_k_regret(task, tmp_path)
    assert regret <= CI_TASKS[seed], (task.name, regret, [m["name"] for m in ranking["modules"]][:6])
    search = ranking["search"]
    stage1, stage2 = search["stage1"], search["stage2"]
    assert 0 < stage1["steps"] <= stage1["max_steps"] and stage1["stop_reason"] in {"settled", "cap"}
    assert 0 < stage2["steps"] <= stage2["max_steps"] and stage2["stop_reason"] in {"settled", "cap"}
    assert stage1["loss_last"] < stage1["loss_first"]
    assert set(search["certainty"]) == {"settled", "warmup", "gates"}
    assert search["relearn"]["steps"] == 32 and search["relearn"]["stop_reason"] == "fixed length"
    assert search["versions"]["axolotl"]
    if seed == min(CI_TASKS, key=lambda s: task_for(s).steps):
        # Same config and seed: the same ranking, score for score.
        again = tmp_path / "again"
        files = build_task(task, tmp_path / "task")
        run_search(write_config(search_config(task, files, again, again / "ranking.json"), again / "search.yml"))
        repeat = load_json(again / "ranking.json")
        assert [m["name"] for m in repeat["modules"]] == [m["name"] for m in ranking["modules"]]
        assert [m["score"] for m in repeat["modules"]] == pytest.approx([m["score"] for m in ranking["modules"]], abs=1e-6)


def test_random_tasks_cover_the_families_and_run_lengths_and_are_reproducible():
    tasks = [random_task(seed) for seed in range(40)]
    assert {t.family for t in tasks} == {"llama", "qwen2", "mistral", "gpt_neox"}
    assert all(150 <= t.steps <= 1000 and 2 <= t.k <= 4 and 2 <= t.layers <= 5 for t in tasks)
    assert any(t.steps <= 250 for t in tasks) and any(t.steps >= 400 for t in tasks)
    assert random_task(7) == random_task(7)
    assert PlantedTask.from_dict(random_task(7).to_dict()) == random_task(7)


def test_plant_changes_exactly_the_planted_weights_by_the_asked_size(tmp_path):
    from benchmarks.common.tiny_models import build_model
    from benchmarks.planted.tasks import candidate_modules, plant

    task = random_task(1)  # qwen2: q/k/v biases stay as they are
    base = build_model(tmp_path / "m", task.family, layers=task.layers, hidden=task.hidden, vocab_size=64, initializer_range=task.init_range)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    plant(base, task)
    changed = {n for n, p in base.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"{name}.weight" for name in task.planted}
    for name in task.planted:
        delta = base.get_submodule(name).weight - before[f"{name}.weight"]
        assert float(delta.norm() / before[f"{name}.weight"].norm()) == pytest.approx(task.delta_scale, rel=1e-4)
        assert int(torch.linalg.matrix_rank(delta)) == task.delta_rank
    assert set(task.planted) <= set(candidate_modules(task.family, task.layers))


def test_train_lora_gives_one_loss_per_set_of_modules(tmp_path, one_thread):
    """What keep_k_regret's shortcut rests on: the order a set of modules is
    named in, and training it again, do not change the loss."""
    task = random_task(3)
    files = build_task(task, tmp_path / "task")
    names = list(task.planted)
    first = train_lora(files, task, names, steps=4)
    assert train_lora(files, task, list(reversed(names)), steps=4) == first
    assert train_lora(files, task, names[1:], steps=4) != first


def test_the_docs_tables_are_the_ones_the_record_prints():
    """docs/planted.md shows the tables ``python -m benchmarks.planted.run
    --docs-tables`` prints from the record, each in a block of its own."""
    import re

    from benchmarks.planted.run import DOCS_TABLES, docs_tables

    docs = (Path(__file__).resolve().parents[1] / "docs" / "planted.md").read_text(encoding="utf-8")
    shown = re.findall(r"```\n(task .*?)\n```", docs, re.S)
    assert len(shown) == len(DOCS_TABLES)
    assert shown == docs_tables()


def test_a_strategy_is_found_by_its_settings_not_its_name():
    from axolotl_ila.args import ILAArgs
    from benchmarks.planted.run import GATES_ONLY, STRATEGIES, Strategy

    keys = [s.key() for s in STRATEGIES.values()]
    assert len(set(keys)) == len(keys)
    renamed = Strategy("score", dict(GATES_ONLY), "any name, any words")
    assert renamed.key() == STRATEGIES["ila_gates_only"].key()
    assert STRATEGIES["update_norm"].key() != STRATEGIES["ila_gates_only"].key()  # same search, other order
    assert STRATEGIES["update_norm"].search() == STRATEGIES["ila_gates_only"].search()
    settings = STRATEGIES["ila"].search()["settings"]
    assert set(settings) == {k for k in ILAArgs.model_fields if k.startswith("ila_")} - {"ila_ranking"}
    assert settings["ila_relearn_steps"] == 32 and STRATEGIES["ila_gates_only"].search()["settings"]["ila_relearn_steps"] == 0


def test_a_finished_result_is_skipped_and_a_lost_one_is_rebuilt_from_the_record(tmp_path, monkeypatch):
    """Resumable: with the task's truth, search and module sets in the record,
    a missing result is made again from them, the same numbers, with nothing
    built or trained; a finished one is left alone."""
    import json

    from benchmarks.planted import run
    from benchmarks.planted.record import KINDS, Record

    task = run.task_for(952)
    for kind in KINDS:
        lines = [line for line in Record(run.RESULTS).lines[kind] if line["task"] == task.to_dict()]
        if kind == "results":
            kept = [line for line in lines if line["strategy"] != "ila"]
            (lost,) = [line for line in lines if line["strategy"] == "ila"]
            lines = kept
        (tmp_path / f"{kind}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")

    def no_build(*args, **kwargs):
        raise AssertionError("the record holds everything this needs")

    monkeypatch.setattr(run, "build_task", no_build)
    run.run_task(952, ["ila", "ila_gates_only"], tmp_path / "work", tmp_path)
    results = Record(tmp_path).lines["results"]
    assert len(results) == len(kept) + 1
    again = results[-1]
    fields = ("strategy", "key", "task", "search_key", "search", "order", "top_k", "loss", "planted_loss", "regret", "recall")
    assert {k: again[k] for k in fields} == {k: lost[k] for k in fields}
    assert {k: again[k] for k in ("planted_ranks", "search_steps", "warmup", "gates")} == {
        k: lost[k] for k in ("planted_ranks", "search_steps", "warmup", "gates")
    }


def test_the_record_reads_past_a_torn_last_line_and_the_next_line_replaces_it(tmp_path):
    from benchmarks.planted.record import Record

    task = {"seed": 1}
    kept = Record(tmp_path)
    kept.add("sets", {"task": task, "modules": ["b", "a"], "loss": 1.0})
    with (tmp_path / "sets.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"task": {"seed": 1}, "modules": ["c"], "lo')  # a run stopped mid-line
    with pytest.warns(UserWarning, match="torn"):
        kept = Record(tmp_path)
    assert kept.get("sets", task, "a|b")["loss"] == 1.0 and kept.get("sets", task, "c") is None
    with pytest.warns(UserWarning, match="cut off a torn last line"):
        kept.add("sets", {"task": task, "modules": ["c"], "loss": 2.0})
    lines = (tmp_path / "sets.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and Record(tmp_path).get("sets", task, "c")["loss"] == 2.0
