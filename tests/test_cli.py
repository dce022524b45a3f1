"""``axolotl-ila`` show / compare / combine / search / quickstart, on rankings
made by the real search on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import adapter_modules, make_config, read_json, run_python, write_config

from axolotl_ila.cli.commands import main
from axolotl_ila.cli.quickstart import render_config
from axolotl_ila.ranking.analysis import combine, jaccard, mean_ranks, top_set
from axolotl_ila.ranking.file import Ranking, load_ranking, save_ranking
from axolotl_ila.report.heatmap import DPI, figure_size

REPO = Path(__file__).resolve().parents[1]


def reversed_copy(ranking: Ranking, path: Path) -> Path:
    """Same model, opposite order: its bottom set is the original's top set."""
    scores = {m.name: float(i) for i, m in enumerate(ranking.modules)}
    save_ranking(Ranking.from_scores(scores, model=ranking.model, search={"method": "test"}), path)
    return path


def test_show_prints_tables_and_writes_a_heatmap_of_the_documented_size(searched, tmp_path, capsys):
    png = tmp_path / "heat.png"
    assert main(["show", str(searched["ranking"]), "--top", "3", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    ranking = load_ranking(searched["ranking"])
    assert ranking.names[0] in out and ranking.names[-1] in out
    assert "per type (kept/all):" in out and "self_attn.q_proj" in out
    assert "per block (kept/all):" in out and "0:" in out and "3:" in out
    assert "at drop 0.25: kept 21, dropped 7" in out

    from PIL import Image

    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        width, height = figure_size(ranking)
        assert image.size == (round(width * DPI), round(height * DPI))
        assert image.format == "PNG"


def test_show_json(searched, capsys):
    assert main(["show", str(searched["ranking"]), "--keep-fraction", "0.3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["modules"]) == 28
    assert sum(m["kept"] for m in data["modules"]) == 8
    assert data["per_block"]["0"]["all"] == 7
    assert data["selection"]["mode"] == "keep"


def test_show_with_fused_groups_marks_whole_groups(searched, tmp_path, capsys):
    from axolotl_ila.selection import select

    png = tmp_path / "grouped.png"
    assert main(["show", str(searched["ranking"]), "--keep-fraction", "0.3", "--fused-groups", "--json", "--png", str(png)]) == 0
    data = json.loads(capsys.readouterr().out)
    ranking = load_ranking(searched["ranking"])
    expected = select(ranking.names, ranking.names, "ila", keep_fraction=0.3, groups=("qkv", "mlp"))
    assert data["selection"]["groups"] == ["qkv", "mlp"]
    assert {m["name"] for m in data["modules"] if m["kept"]} == set(expected.kept)
    assert png.stat().st_size > 0
    assert main(["show", str(searched["ranking"]), "--fused-groups"]) == 0
    assert "(whole qkv, mlp)" in capsys.readouterr().out


def test_the_search_writes_its_heatmap_next_to_the_ranking(searched):
    png = searched["ranking"].with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_identical_rankings_compare_to_one(searched, tmp_path, capsys):
    copy = shutil.copy(searched["ranking"], tmp_path / "copy.json")
    assert main(["compare", str(searched["ranking"]), str(copy)]) == 0
    out = capsys.readouterr().out
    assert "tiny-llama vs copy: 1.000" in out
    assert main(["compare", str(searched["ranking"]), str(copy), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["pairs"][0]["jaccard"] == 1.0 and data["top"] == 0.75


def test_compare_of_opposite_rankings(searched, tmp_path, capsys):
    ranking = load_ranking(searched["ranking"])
    other = reversed_copy(ranking, tmp_path / "reversed.json")
    assert main(["compare", str(searched["ranking"]), str(other), "--top", "0.5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["pairs"][0]["jaccard"] == 0.0  # top halves of opposite orders are disjoint
    assert jaccard(top_set(ranking, 0.75), top_set(load_ranking(other), 0.75)) == pytest.approx(14 / 28)


def test_compare_refuses_another_architecture(searched, tmp_path, capsys):
    data = read_json(searched["ranking"])
    data["model"]["fingerprint"] = "sha256:" + "0" * 64
    data["model"]["base_model"] = "another/model"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    assert main(["compare", str(searched["ranking"]), str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("axolotl-ila: error:") and "rank different architectures" in err and str(other) in err
    assert len(err.strip().splitlines()) == 1


def test_intersect_of_disjoint_bottom_sets_drops_nothing(searched, tmp_path, capsys):
    ranking = load_ranking(searched["ranking"])
    other = reversed_copy(ranking, tmp_path / "reversed.json")
    out = tmp_path / "combined.json"
    assert main(["combine", str(searched["ranking"]), str(other), "-o", str(out)]) == 0
    assert "nothing is common to all bottom sets" in capsys.readouterr().out
    combined = load_ranking(out)  # a valid ranking
    details = combined.search["combine"]
    assert details["least_important"] == [] and details["drop_fraction_for_intersection"] == 0.0
    assert [i["path"] for i in details["inputs"]] == [str(searched["ranking"]), str(other)]
    assert all(i["digest"].startswith("sha256:") for i in details["inputs"])
    assert combined.fingerprint == ranking.fingerprint


def test_intersect_of_identical_rankings_keeps_their_bottom_last(searched, tmp_path):
    copy = shutil.copy(searched["ranking"], tmp_path / "copy.json")
    out = tmp_path / "combined.json"
    assert main(["combine", str(searched["ranking"]), str(copy), "-o", str(out), "--k-fraction", "0.25"]) == 0
    ranking = load_ranking(searched["ranking"])
    combined = load_ranking(out)
    assert combined.search["combine"]["least_important"] == ranking.names[-7:]
    assert combined.names[-7:] == ranking.names[-7:]


def test_mean_rank_by_hand():
    model = {"fingerprint": "sha256:x"}
    a = Ranking.from_scores({"a": 3, "b": 2, "c": 1}, model=model, search={})  # ranks a0 b1 c2
    b = Ranking.from_scores({"a": 1, "b": 3, "c": 2}, model=model, search={})  # ranks b0 c1 a2
    assert mean_ranks([a, b]) == {"a": 1.0, "b": 0.5, "c": 1.5}
    combined = combine([a, b], ["a.json", "b.json"], method="mean-rank")
    assert combined.names == ["b", "a", "c"]
    assert [m.score for m in combined.modules] == [-0.5, -1.0, -1.5]
    assert combined.scorer == "combined-mean-rank"


def test_combine_never_overwrites_a_user_file(searched, tmp_path, capsys):
    precious = tmp_path / "notes.yml"
    precious.write_text("my: notes\n")
    code = main(["combine", str(searched["ranking"]), str(searched["ranking"]), "-o", str(precious), "--method", "mean-rank"])
    assert code == 2
    assert str(precious) in capsys.readouterr().err
    assert precious.read_text() == "my: notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.yml"]  # no temp file left


@pytest.mark.parametrize(
    "argv, message",
    [
        (["show", "missing.json"], "does not exist"),
        (["show", "{ranking}", "--drop-fraction", "1.5"], "--drop-fraction must be between 0 and 1"),
        (["show", "{ranking}", "--keep-fraction", "0.01"], "ila_keep_fraction: 0.01 of 28 modules would leave no module"),
        (["compare", "{ranking}"], "compare needs at least two rankings"),
        (["compare", "{ranking}", "{ranking}", "--top", "0"], "--top must be in (0, 1]"),
        (["combine", "{ranking}", "{ranking}", "-o", "{tmp}/x.json", "--k-fraction", "1"], "--k-fraction must be in (0, 1)"),
    ],
)
def test_errors_are_one_line_with_status_2(searched, tmp_path, capsys, argv, message):
    argv = [a.format(ranking=searched["ranking"], tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("axolotl-ila: error:") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.json").exists()


@pytest.mark.e2e
def test_search_subcommand_writes_ranking_and_heatmap(tiny_llama, tmp_path):
    ranking = tmp_path / "r" / "tiny.json"
    cfg = make_config(tiny_llama, tmp_path, ila_ranking=str(ranking), ila_gate_steps=8, ila_strategy="random")
    config = write_config(cfg, tmp_path / "config.yml")
    done = run_python(["-m", "axolotl_ila.cli", "search", str(config)], cwd=Path.cwd(), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert load_ranking(ranking).search["stage2"]["steps"] == 8
    assert ranking.with_suffix(".png").exists()
    assert "ranking written to" in done.stdout
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()  # searched, did not train


def test_example_tiny_config_is_what_quickstart_writes():
    assert (REPO / "example_configs" / "tiny-cpu.yml").read_text() == render_config()


@pytest.mark.e2e
def test_quickstart_trains_with_ila(tmp_path):
    done = run_python(["-m", "axolotl_ila.cli", "quickstart", "--dir", "qs"], cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    ranking = load_ranking(tmp_path / "qs" / "rankings" / "tiny-llama.json")
    assert adapter_modules(tmp_path / "qs" / "outputs" / "lora-ila") == set(ranking.names[:21])
    assert (tmp_path / "qs" / "rankings" / "tiny-llama.png").exists()
