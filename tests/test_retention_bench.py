"""The retention study's harness (``benchmarks.retention``: its scripts and the
lm-eval task definitions in benchmarks/retention/tasks/), end to end on the tiny model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TEST_ENV, adapter_modules, read_json

from axolotl_ila.atomic import write_jsonl
from axolotl_ila.cli.workspace import make_alpaca_rows
from benchmarks.retention import data as retention_data
from benchmarks.retention import run as retention
from benchmarks.retention import stats as retention_stats

REPO = Path(__file__).resolve().parents[1]
STUDY = [sys.executable, "-m", "benchmarks.retention.run"]  # run from the repository root


def test_each_source_becomes_one_item_shape():
    hellaswag = {"activity_label": "Roof", "ctx_a": "A man is on a roof.", "ctx_b": "he", "endings": ["falls [title] down.", "waves."], "label": "1"}
    assert retention_data.hellaswag_item(hellaswag) == {"query": "Roof: A man is on a roof. He", "choices": ["falls. down.", "waves."], "gold": 1}
    arc = {"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["1", "2"]}, "answerKey": "2"}
    assert retention_data.arc_item(arc) == {"query": "Question: Which is a gas?\nAnswer:", "choices": ["ice", "steam"], "gold": 1}
    piqa = {"goal": "Open a jar", "sol1": "twist", "sol2": "bite", "label": 0}
    assert retention_data.piqa_item(piqa)["choices"] == ["twist", "bite"]
    mmlu = {"subject": "high_school_physics", "question": " What is g? ", "choices": ["9.8", "1", "0", "3"], "answer": 0}
    assert retention_data.mmlu_item(mmlu)["query"] == "The following is a question about high school physics.\nQuestion: What is g?\nAnswer:"


def test_subsets_are_seeded_and_keep_source_ids():
    docs = [{"goal": f"g{i}", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(50)]
    first = retention_data.subset("piqa", docs, 10, seed=0)
    assert first == retention_data.subset("piqa", docs, 10, seed=0)
    assert [r["id"] for r in first] != [r["id"] for r in retention_data.subset("piqa", docs, 10, seed=1)]
    assert all(docs[int(r["id"].split("-")[1])]["goal"] == r["query"].split("Question: ")[1].split("\n")[0] for r in first)
    assert len(retention_data.subset("piqa", docs, 500, seed=0)) == 50


def tiny_benchmark(path: Path) -> list[dict]:
    """A multiple-choice task in the prepared shape, about the tiny model's data."""
    items = []
    for i, row in enumerate(make_alpaca_rows(12, seed=7)):
        wrong = make_alpaca_rows(1, seed=100 + i)[0]["output"]
        items.append({"id": f"tiny-{i}", "query": f"{row['instruction']} {row['input']}\nAnswer:", "choices": [row["output"], wrong], "gold": 0})
    write_jsonl(path, items)
    return items


@pytest.mark.e2e
def test_study_trains_scores_and_resumes(tiny_llama, searched, tmp_path):
    data = tmp_path / "bench"
    for name, seed in (("alpha", 1), ("beta", 2)):  # the one trained on, and one out of domain
        rows = make_alpaca_rows(80, seed=seed)
        write_jsonl(data / name / "train.jsonl", rows[:64])
        write_jsonl(data / name / "eval.jsonl", rows[64:])
    items = tiny_benchmark(tmp_path / "retention" / "arc_easy.jsonl")  # read by the real ila_arc_easy task
    rankings = tmp_path / "rankings"
    rankings.mkdir()
    shutil.copyfile(searched["ranking"], rankings / "alpha-seed1.json")
    results = tmp_path / "results"
    cmd = [
        *STUDY, "--model", str(tiny_llama["model"]), "--data", str(data),
        "--dataset", "alpha", "--retention-data", str(tmp_path / "retention"), "--tasks", "ila_arc_easy",
        "--rankings", str(rankings), "--workdir", str(tmp_path / "work"), "--results", str(results),
        "--seeds", "1", "--epochs", "2", "--train-rows", "48", "--variants", "all", "ila keep .3",
    ]
    env = {**os.environ, **TEST_ENV}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    base = read_json(results / "base.json")
    all_run = read_json(results / "alpha-e2-r48-s1-all.json")
    ila_run = read_json(results / "alpha-e2-r48-s1-ila-keep-3.json")
    # Every item scored, 0/1 each, and lm-eval's accuracy is the mean of the items.
    for run in (base, all_run, ila_run):
        scores = run["benchmarks"]["ila_arc_easy"]
        assert sorted(scores["items"]) == sorted(i["id"] for i in items)
        assert all(v in (0.0, 1.0) for pair in scores["items"].values() for v in pair)
        assert scores["acc"] == pytest.approx(sum(p[0] for p in scores["items"].values()) / len(items))
        assert set(run["loss"]) == {"alpha", "beta"}
    # The variants are what they say: ILA keep .3 adapted 30% of the modules, all of them otherwise.
    work = tmp_path / "work" / "runs"
    assert len(adapter_modules(work / "alpha-e2-r48-s1-all")) == 28
    assert len(adapter_modules(work / "alpha-e2-r48-s1-ila-keep-3")) == round(0.3 * 28)
    # Scores come from the trained weights: training lowered the held-out loss.
    assert all_run["loss"]["alpha"] < base["loss"]["alpha"] - 0.1
    assert ila_run["loss"]["alpha"] != all_run["loss"]["alpha"]
    assert "| ila keep .3 |" in done.stdout and "pooled" in done.stdout

    # A rerun trains and scores nothing again, and prints the same tables.
    stamps = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert again.returncode == 0, again.stderr[-4000:]
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == stamps
    assert again.stdout.strip().splitlines()[-3:] == done.stdout.strip().splitlines()[-3:]


def test_missing_benchmark_data_fails_before_training(tiny_llama, tmp_path):
    write_jsonl(tmp_path / "bench" / "alpha" / "train.jsonl", make_alpaca_rows(8))
    write_jsonl(tmp_path / "bench" / "alpha" / "eval.jsonl", make_alpaca_rows(4))
    done = subprocess.run(
        [*STUDY, "--model", str(tiny_llama["model"]), "--data", str(tmp_path / "bench"),
         "--dataset", "alpha", "--retention-data", str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert done.returncode != 0
    assert "python -m benchmarks.retention.data --out" in done.stderr and "hellaswag.jsonl" in done.stderr
    assert not (tmp_path / "work" / "runs").exists()


def test_a_kept_result_scored_differently_is_refused(tmp_path):
    import argparse
    import json

    kept = tmp_path / "base.json"
    kept.write_text(json.dumps({"variant": "base", "loss_rows": 16, "benchmarks": {"ila_piqa": {}}}), encoding="utf-8")
    retention.check_scored_alike(kept, argparse.Namespace(tasks=["ila_piqa"], loss_rows=16))
    with pytest.raises(SystemExit, match="another --results folder"):
        retention.check_scored_alike(kept, argparse.Namespace(tasks=["ila_piqa", "ila_arc_easy"], loss_rows=16))
    with pytest.raises(SystemExit, match="--loss-rows 16"):
        retention.check_scored_alike(kept, argparse.Namespace(tasks=["ila_piqa"], loss_rows=None))


def write_run(results: Path, name: str, variant: str, dataset: str | None, seed: int | None, loss: dict, items: list[float]) -> None:
    import json

    run = {"variant": variant, "loss": loss, "benchmarks": {"ila_piqa": {"acc": 0.0, "acc_norm": sum(items) / len(items), "items": {f"q{i}": [v, v] for i, v in enumerate(items)}}}}
    if dataset:
        run.update(dataset=dataset, seed=seed)
    (results / f"{name}.json").write_text(json.dumps(run), encoding="utf-8")


def test_summary_sets_each_dataset_side_by_side(tmp_path):
    write_run(tmp_path, "base", "base", None, None, {"a": 3.0, "b": 3.0}, [1, 1, 0, 0])
    for seed, shift in ((1, 0.0), (2, 0.01)):
        # all-module LoRA forgot item q1 on both datasets; "x" kept it when trained on a only
        write_run(tmp_path, f"a-s{seed}-all", "all", "a", seed, {"a": 2.0 + shift, "b": 2.9}, [1, 0, 0, 0])
        write_run(tmp_path, f"a-s{seed}-x", "x", "a", seed, {"a": 2.1 + shift, "b": 2.8}, [1, 1, 0, 0])
        write_run(tmp_path, f"b-s{seed}-all", "all", "b", seed, {"a": 2.95, "b": 2.5 + shift}, [1, 0, 0, 0])
        write_run(tmp_path, f"b-s{seed}-x", "x", "b", seed, {"a": 2.95, "b": 2.5 + shift}, [1, 0, 0, 0])
    table = retention_stats.summary(tmp_path, ["a", "b"], ["all", "x"], [1, 2])
    rows = {tuple(line.split(" | ")[:2]): line.rstrip(" |").split(" | ")[2:] for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    # all-module LoRA against the base model: in-domain loss fell by 0.995, a quarter of the items lost
    assert rows[("| a", "all")][0] == "2" and rows[("| a", "all")][1].startswith("-0.9950") and rows[("| a", "all")][3].startswith("-0.250")
    # x against all-module LoRA, on a: +0.1 in domain (the same every seed: a zero-width interval), -0.1 out of domain, +1/4 items
    assert rows[("| a", "x")][1:] == ["+0.1000 [+0.1000, +0.1000]", "-0.1000 [-0.1000, -0.1000]", "+0.250 [-0.240, +0.740]"]
    # on b nothing differs; pooled, item q1 counts once at the mean of its two differences (+1 and 0)
    assert rows[("| b", "x")][3].startswith("+0.000")
    assert table.splitlines()[-1].startswith("| all 2 datasets | x |") and table.splitlines()[-1].endswith("| +0.125 [-0.120, +0.370] |")


def test_a_study_names_each_dataset_it_trains_on(tmp_path):
    (tmp_path / "bench" / "alpha").mkdir(parents=True)
    (tmp_path / "bench" / "alpha" / "eval.jsonl").write_text("{}\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="'gamma' is not a dataset folder"):
        retention.main(["--model", "m", "--data", str(tmp_path / "bench"), "--dataset", "alpha", "gamma", "--workdir", str(tmp_path / "w"), "--results", str(tmp_path / "r")])
