"""The ranking file: round trip, validation messages, architecture checks, safe writes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from axolotl_ila.atomic import write_json_atomic
from axolotl_ila.ranking import file as ranking_mod
from axolotl_ila.ranking.file import (
    FORMAT,
    VERSION,
    ModuleScore,
    Ranking,
    RankingError,
    check_architecture,
    check_writable,
    load_ranking,
    parse_ranking,
    save_ranking,
)

FP_LLAMA = "sha256:" + "a" * 64
FP_OTHER = "sha256:" + "b" * 64
NAMES = [f"model.layers.{b}.{kind}" for b in range(2) for kind in ("self_attn.q_proj", "mlp.down_proj")]


def make_ranking(fingerprint: str = FP_LLAMA, base_model: str = "tiny/llama", scores: list[float] | None = None) -> Ranking:
    scores = scores or [4.0, 3.0, 2.0, 1.0]
    return Ranking(
        modules=[ModuleScore(name=n, score=s, update_norm=10.0 - s) for n, s in zip(NAMES, scores)],
        model={"base_model": base_model, "model_type": "llama", "fingerprint": fingerprint, "num_linear_modules": len(NAMES)},
        search={"seed": 1, "gate_steps": 16, "losses": [2.0, 1.5]},
    )


def valid_json() -> dict[str, Any]:
    return make_ranking().to_json()


def write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def names_file(path: Path) -> str:
    """A regex that matches the file's path inside a message."""
    return re.escape(str(path))


# -- round trip -----------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    original = make_ranking()
    path = tmp_path / "rankings" / "llama.json"  # parent is created
    save_ranking(original, path)
    loaded = load_ranking(path)
    assert loaded == original
    assert loaded.names == NAMES
    assert loaded.fingerprint == FP_LLAMA
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["version"] == VERSION
    assert data["modules"][0] == {"name": NAMES[0], "score": 4.0, "update_norm": 6.0}


def test_order_by_update_norm_and_ties_keep_file_order():
    r = make_ranking(scores=[4.0, 3.0, 2.0, 1.0])
    assert r.order("update_norm") == list(reversed(NAMES))
    tied = Ranking(
        modules=[ModuleScore(n, 1.0, update_norm=5.0) for n in NAMES],
        model={"fingerprint": FP_LLAMA},
    )
    assert tied.order("update_norm") == NAMES


def test_order_without_update_norms_is_an_error():
    r = Ranking(modules=[ModuleScore(n, 1.0) for n in NAMES], model={"fingerprint": FP_LLAMA})
    with pytest.raises(RankingError, match="no 'update_norm' scores"):
        r.order("update_norm")


def test_from_scores_sorts_and_breaks_ties_by_model_order():
    r = Ranking.from_scores(
        {NAMES[0]: 1.0, NAMES[1]: 2.0, NAMES[2]: 1.0, NAMES[3]: 0.5},
        model={"fingerprint": FP_LLAMA},
        search={},
        module_order=NAMES,
    )
    assert r.names == [NAMES[1], NAMES[0], NAMES[2], NAMES[3]]


# -- validation: every message names the file ------------------------------------


def _mutate(fn) -> dict[str, Any]:
    data = valid_json()
    fn(data)
    return data


BAD_CONTENT = {
    "wrong format": (_mutate(lambda d: d.update(format="something-else")), "not an ILA ranking"),
    "no format": (_mutate(lambda d: d.pop("format")), "'format' is None"),
    "newer version": (_mutate(lambda d: d.update(version=VERSION + 1)), "newer than this axolotl-ila understands"),
    "version string": (_mutate(lambda d: d.update(version="1")), "'version' must be an integer"),
    "version bool": (_mutate(lambda d: d.update(version=True)), "'version' must be an integer"),
    "version zero": (_mutate(lambda d: d.update(version=0)), "unknown version 0"),
    "empty modules": (_mutate(lambda d: d.update(modules=[])), "'modules' must be a non-empty list"),
    "modules not a list": (_mutate(lambda d: d.update(modules={"a": 1})), "'modules' must be a non-empty list"),
    "module without name": (_mutate(lambda d: d["modules"][1].pop("name")), r"modules\[1\] must be an object"),
    "duplicate name": (
        _mutate(lambda d: d["modules"][1].update(name=d["modules"][0]["name"])),
        f"module {re.escape(NAMES[0])} appears twice",
    ),
    "peft prefix": (
        _mutate(lambda d: d["modules"][0].update(name="base_model.model." + NAMES[0])),
        "PEFT-wrapped name",
    ),
    "nan score": (_mutate(lambda d: d["modules"][2].update(score=float("nan"))), r"modules\[2\].*no finite 'score'"),
    "inf score": (_mutate(lambda d: d["modules"][0].update(score=float("inf"))), r"modules\[0\].*no finite 'score'"),
    "missing score": (_mutate(lambda d: d["modules"][0].pop("score")), "no finite 'score'"),
    "string score": (_mutate(lambda d: d["modules"][0].update(score="1.0")), "no finite 'score'"),
    "nan update_norm": (
        _mutate(lambda d: d["modules"][3].update(update_norm=float("nan"))),
        "no finite 'update_norm'",
    ),
    "wrong order": (
        _mutate(lambda d: d["modules"].reverse()),
        "not ordered most important first",
    ),
    "no fingerprint": (_mutate(lambda d: d["model"].pop("fingerprint")), "'fingerprint' string"),
    "search not object": (_mutate(lambda d: d.update(search=[1])), "'search' must be an object"),
    "scorer not string": (_mutate(lambda d: d.update(scorer=3)), "'scorer' must be a string"),
    "top level list": ([1, 2, 3], "is not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONTENT))
def test_invalid_content_is_refused_with_the_file_named(tmp_path, case):
    data, reason = BAD_CONTENT[case]
    # json.dumps writes NaN/Infinity, which Python's json reads back: the checks
    # must catch them, not the parser.
    path = write(tmp_path / "bad ranking.json", data)
    with pytest.raises(RankingError, match=reason) as info:
        load_ranking(path)
    assert str(path) in str(info.value)


def test_not_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"format": "axolotl-ila-ranking", ', encoding="utf-8")
    with pytest.raises(RankingError, match=f"{names_file(path)}.*is not valid JSON"):
        load_ranking(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RankingError, match=f"{names_file(path)}.*is not valid JSON"):
        load_ranking(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(RankingError, match=f"{names_file(path)} does not exist"):
        load_ranking(path)


def test_directory(tmp_path):
    path = tmp_path / "a-dir.json"
    path.mkdir()
    with pytest.raises(RankingError, match=f"{names_file(path)}.*is not a file"):
        load_ranking(path)


def test_parse_ranking_names_the_given_path():
    with pytest.raises(RankingError, match="somewhere/x.json"):
        parse_ranking({"format": "nope"}, "somewhere/x.json")


# -- architecture ----------------------------------------------------------------


def test_check_architecture_refuses_another_fingerprint(tmp_path):
    path = tmp_path / "llama.json"
    r = make_ranking(fingerprint=FP_LLAMA, base_model="meta-llama/Llama-2-7b-hf")
    with pytest.raises(RankingError, match="another architecture") as info:
        check_architecture(r, FP_OTHER, "mistralai/Mistral-7B-v0.1", path)
    message = str(info.value)
    assert str(path) in message
    assert "meta-llama/Llama-2-7b-hf" in message and "mistralai/Mistral-7B-v0.1" in message


def test_check_architecture_same_fingerprint_other_base_model_only_warns(tmp_path):
    path = tmp_path / "llama.json"
    r = make_ranking(base_model="meta-llama/Llama-2-7b-hf")
    warnings = check_architecture(r, FP_LLAMA, "NousResearch/Llama-2-7b-hf", path)
    assert len(warnings) == 1
    assert str(path) in warnings[0] and "NousResearch/Llama-2-7b-hf" in warnings[0]


def test_check_architecture_same_model_is_silent(tmp_path):
    r = make_ranking(base_model="meta-llama/Llama-2-7b-hf")
    assert check_architecture(r, FP_LLAMA, "meta-llama/Llama-2-7b-hf", tmp_path / "x.json") == []
    assert check_architecture(r, FP_LLAMA, None, tmp_path / "x.json") == []


# -- safe writes -----------------------------------------------------------------


def test_check_writable_accepts_missing_file_and_same_architecture(tmp_path):
    check_writable(tmp_path / "new.json", FP_LLAMA)
    check_writable(tmp_path / "not-yet" / "new.json", FP_LLAMA)
    path = tmp_path / "old.json"
    save_ranking(make_ranking(), path)
    check_writable(path, FP_LLAMA)


def test_save_refreshes_a_ranking_of_the_same_architecture(tmp_path):
    path = tmp_path / "r.json"
    save_ranking(make_ranking(scores=[4.0, 3.0, 2.0, 1.0]), path)
    save_ranking(make_ranking(scores=[9.0, 8.0, 7.0, 6.0]), path)
    assert load_ranking(path).modules[0].score == 9.0


@pytest.mark.parametrize(
    "content",
    [
        b"base_model: meta-llama/Llama-2-7b-hf\nadapter: lora\n",  # a user's YAML
        b'{"some": "json"}',
        b"",
    ],
    ids=["yaml", "other-json", "empty"],
)
def test_never_overwrites_a_file_that_is_not_a_ranking(tmp_path, content):
    path = tmp_path / "config.yml"
    path.write_bytes(content)
    with pytest.raises(RankingError, match=f"{names_file(path)} exists and is not a valid ILA ranking"):
        check_writable(path, FP_LLAMA)
    with pytest.raises(RankingError, match="will not be overwritten"):
        save_ranking(make_ranking(), path)
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yml"]


def test_never_overwrites_another_architectures_ranking(tmp_path):
    path = tmp_path / "mistral.json"
    save_ranking(make_ranking(fingerprint=FP_OTHER, base_model="mistralai/Mistral-7B-v0.1"), path)
    before = path.read_bytes()
    with pytest.raises(RankingError, match=f"{names_file(path)} holds a ranking for another architecture"):
        check_writable(path, FP_LLAMA)
    with pytest.raises(RankingError, match="mistralai/Mistral-7B-v0.1"):
        save_ranking(make_ranking(fingerprint=FP_LLAMA), path)
    assert path.read_bytes() == before


def test_refuses_a_directory_or_a_file_as_parent(tmp_path):
    with pytest.raises(RankingError, match="is a directory"):
        check_writable(tmp_path, FP_LLAMA)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(RankingError, match="is not a directory"):
        check_writable(blocker / "r.json", FP_LLAMA)


def test_save_refuses_an_invalid_ranking_and_writes_nothing(tmp_path):
    path = tmp_path / "r.json"
    bad = make_ranking(scores=[1.0, 2.0, 3.0, 4.0])  # ascending: not most important first
    with pytest.raises(RankingError, match="not ordered"):
        save_ranking(bad, path)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path = tmp_path / "r.json"
    for scores in ([4.0, 3.0, 2.0, 1.0], [8.0, 3.0, 2.0, 1.0]):
        save_ranking(make_ranking(scores=scores), path)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    save_ranking(make_ranking(), path)
    before = path.read_bytes()

    def exploding_dump(obj, handle, **kwargs):
        handle.write('{"format": "axolotl-ila-ranking", "modu')  # half a file
        raise OSError("disk full")

    monkeypatch.setattr(ranking_mod.json, "dump", exploding_dump)
    with pytest.raises(OSError, match="disk full"):
        save_ranking(make_ranking(scores=[9.0, 8.0, 7.0, 6.0]), path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert load_ranking(path) == make_ranking()


def test_write_json_atomic_interrupted_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "new.json"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ranking_mod.json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(path, {"a": 1})
    assert list(tmp_path.iterdir()) == []
