"""Rankings travel: ``hf://`` rankings from the Hugging Face cache, the ranking's
copy beside the adapter, and ``axolotl ila``.

No network: a Hub file is put into a temporary Hugging Face cache in the layout
``huggingface_hub`` keeps (``models--OWNER--REPO/refs``, ``snapshots``, ``blobs``)
and read with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TEST_ENV, adapter_modules, make_config, read_json, run_python, run_train, write_config

from axolotl_ila.cli.commands import main
from axolotl_ila.ranking.file import Ranking, RankingError, load_ranking, locate_ranking
from axolotl_ila.ranking.hub import ACCEPTED_FORMS, HubPath, HubPathError, parse_hub_path

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def hub_cache(root: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",), blobs: bool = True) -> Path:
    """Put ``files`` into a Hugging Face cache at ``root`` as ``hf_hub_download``
    leaves them: the snapshot of ``commit``, named by ``refs``; with ``blobs`` the
    snapshot holds links into ``blobs/<sha256>``, else the files themselves."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    for path, data in files.items():
        target = repo / "snapshots" / commit / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if blobs:
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            target.symlink_to(os.path.relpath(blob, target.parent))
        else:
            target.write_bytes(data)
    return root


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline, for this process and its children."""
    from huggingface_hub import constants

    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root


def reversed_copy(ranking: Ranking) -> bytes:
    scores = {m.name: float(i) for i, m in enumerate(ranking.modules)}
    return json.dumps(Ranking.from_scores(scores, model=ranking.model, search={"method": "test"}).to_json()).encode()


# -- hf:// paths ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("hf://alice/rankings/llama.json", HubPath("alice/rankings", "llama.json")),
        ("hf://alice/rankings/rankings/llama-2-7b.json", HubPath("alice/rankings", "rankings/llama-2-7b.json")),
        ("hf://alice/rankings@v1/rankings/llama.json", HubPath("alice/rankings", "rankings/llama.json", "v1")),
        (f"hf://alice/rankings@{COMMIT_A}/r.json", HubPath("alice/rankings", "r.json", COMMIT_A)),
        ("hf://alice/rankings@refs/pr/3/r.json", HubPath("alice/rankings", "r.json", "refs/pr/3")),
        ("hf://alice/rankings@my%2Fbranch/r.json", HubPath("alice/rankings", "r.json", "my/branch")),
    ],
)
def test_hub_paths_of_the_hffilesystem_form_are_read_and_written_back(text, expected):
    assert parse_hub_path(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text, problem",
    [
        ("hf:/alice/rankings/r.json", "starts with hf://"),
        ("hf://alice/rankings", "names no file"),
        ("hf://alice/rankings/", "names no file"),
        ("hf://alice/r.json", "names no file"),
        ("hf://alice/rankings/r.yaml", "not a .json file"),
        ("hf://alice/rankings@/r.json", "revision after @ is empty"),
        ("hf://alice/rankings/x/../r.json", "'..' part"),
        ("hf://al ice/rankings/r.json", "not a valid owner"),
        ("hf://alice/rank--ings/r.json", "not a valid repo name"),
        ("hf://datasets/alice/rankings/r.json", "model repos, not datasets repos"),
        ("hf://alice/rankings/sub@v1/r.json", "right after the repo name"),
    ],
)
def test_malformed_hub_paths_are_refused_with_the_accepted_forms(text, problem):
    with pytest.raises(HubPathError) as info:
        parse_hub_path(text)
    assert problem in str(info.value) and ACCEPTED_FORMS in str(info.value)


def test_config_validation_refuses_a_malformed_hub_path(refused):
    message = refused("ranking path 'hf://alice/rankings'", ila_ranking="hf://alice/rankings")
    assert "names no file inside the repo" in message and ACCEPTED_FORMS in message


def test_config_validation_refuses_ila_search_always_with_a_hub_ranking(refused):
    message = refused("ila_search: always", ila_ranking="hf://alice/rankings/r.json", ila_search="always")
    assert "a search cannot write" in message
    assert "hf upload OWNER/REPO rankings/NAME.json rankings/NAME.json" in message


def test_config_validation_accepts_both_hub_forms(load):
    assert load(ila_ranking="hf://alice/rankings/r.json").ila_ranking == "hf://alice/rankings/r.json"
    assert load(ila_ranking="hf://alice/rankings@v1/r.json", ila_search="never").ila_search == "never"


# -- fetching from the cache ----------------------------------------------------


def test_a_revision_picks_its_own_snapshot_and_is_recorded_with_its_commit(offline_cache, searched):
    data_a = searched["ranking"].read_bytes()
    data_b = reversed_copy(load_ranking(searched["ranking"]))
    hub_cache(offline_cache, "alice/rankings", COMMIT_A, {"rankings/tiny.json": data_a}, refs=("main",))
    hub_cache(offline_cache, "alice/rankings", COMMIT_B, {"rankings/tiny.json": data_b}, refs=("v2",), blobs=False)

    for text, data, commit, revision in [
        ("hf://alice/rankings/rankings/tiny.json", data_a, COMMIT_A, "main"),
        ("hf://alice/rankings@v2/rankings/tiny.json", data_b, COMMIT_B, "v2"),
        (f"hf://alice/rankings@{COMMIT_A}/rankings/tiny.json", data_a, COMMIT_A, COMMIT_A),
    ]:
        found = locate_ranking(text)
        assert found.local_path.read_bytes() == data
        ranking = load_ranking(text)
        identity = found.identity(ranking)
        assert identity["path"] == text
        assert identity["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
        assert identity["hub"] == {"repo": "alice/rankings", "path_in_repo": "rankings/tiny.json", "revision": revision, "commit": commit}
    assert load_ranking("hf://alice/rankings@v2/rankings/tiny.json").names == list(reversed(load_ranking(searched["ranking"]).names))


def test_a_hub_file_missing_offline_says_how_to_make_and_share_one(offline_cache):
    hub_cache(offline_cache, "alice/rankings", COMMIT_A, {"rankings/other.json": b"{}"})
    with pytest.raises(RankingError) as info:
        locate_ranking("hf://alice/rankings@v1/rankings/llama.json")
    message = str(info.value)
    assert message.startswith("ranking hf://alice/rankings@v1/rankings/llama.json: HF_HUB_OFFLINE is set and the file is not in the Hugging Face cache")
    assert str(offline_cache) in message
    assert "`hf download alice/rankings rankings/llama.json --revision v1`" in message
    assert "never replaced by a search" in message
    assert "set ila_ranking: rankings/llama.json (a local path) and run `axolotl-ila search CONFIG`" in message
    assert "`hf upload alice/rankings rankings/llama.json rankings/llama.json --revision v1`" in message


def test_a_hub_file_that_is_not_a_ranking_is_refused_naming_the_hub_path(offline_cache):
    hub_cache(offline_cache, "alice/rankings", COMMIT_A, {"notes.json": b'{"format": "something else"}'})
    with pytest.raises(RankingError, match=r"^ranking file hf://alice/rankings/notes.json: 'format' is 'something else'"):
        load_ranking("hf://alice/rankings/notes.json")


# -- the CLI takes hf:// rankings -------------------------------------------------


def test_show_and_compare_read_hub_rankings_and_combine_does_not_write_to_the_hub(offline_cache, searched, tmp_path, capsys):
    local = searched["ranking"]
    hub_cache(offline_cache, "alice/rankings", COMMIT_A, {"tiny.json": local.read_bytes()})
    hub = "hf://alice/rankings/tiny.json"

    assert main(["show", str(local)]) == 0
    from_file = capsys.readouterr().out
    assert main(["show", hub]) == 0
    from_hub = capsys.readouterr().out
    assert from_hub.splitlines()[0] == f"ranking   {hub}"
    assert from_hub.splitlines()[1:] == from_file.splitlines()[1:]

    assert main(["compare", hub, str(local), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"][0]["jaccard"] == 1.0

    assert main(["combine", hub, str(local), "-o", "hf://alice/rankings/combined.json"]) == 2
    error = capsys.readouterr().err
    assert "axolotl-ila: error: hf://alice/rankings/combined.json is on the Hugging Face Hub" in error
    assert "hf upload OWNER/REPO rankings/NAME.json rankings/NAME.json" in error
    out = tmp_path / "combined.json"
    assert main(["combine", hub, str(local), "-o", str(out)]) == 0
    inputs = read_json(out)["search"]["combine"]["inputs"]
    assert inputs[0]["path"] == hub


def test_search_refuses_a_config_whose_ranking_is_on_the_hub(tiny_llama, tmp_path, capsys):
    cfg = make_config(tiny_llama, tmp_path, ila_ranking="hf://alice/rankings/rankings/tiny.json")
    assert main(["search", str(write_config(cfg, tmp_path / "config.yml"))]) == 2
    error = capsys.readouterr().err
    assert "axolotl-ila: error: hf://alice/rankings/rankings/tiny.json is on the Hugging Face Hub, which axolotl-ila does not write to" in error
    assert "hf upload OWNER/REPO rankings/NAME.json rankings/NAME.json" in error
    assert not (tmp_path / "run" / ".ila_search").exists()  # refused before the search


# -- trainings ------------------------------------------------------------------


@pytest.mark.e2e
def test_a_training_loads_its_ranking_from_the_hub_cache_offline_and_trains_the_kept_set(offline_cache, searched, tiny_llama, tmp_path):
    data = searched["ranking"].read_bytes()
    hub_cache(offline_cache, "alice/tiny-rankings", COMMIT_A, {"rankings/tiny-llama.json": data})
    hub = "hf://alice/tiny-rankings/rankings/tiny-llama.json"
    cfg = make_config(tiny_llama, tmp_path, ila_ranking=hub, ila_keep_fraction=0.3, max_steps=3)
    result = run_train(write_config(cfg, tmp_path / "config.yml"))
    logs = result.stdout + result.stderr
    run = tmp_path / "run"

    ranking = load_ranking(searched["ranking"])
    assert adapter_modules(run) == set(ranking.names[:8])  # round(0.3 * 28)
    assert "ILA search: warm-up" not in logs
    record = read_json(run / "ila_selection.json")
    assert record["ranking"]["path"] == hub
    assert record["ranking"]["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert record["ranking"]["hub"] == {"repo": "alice/tiny-rankings", "path_in_repo": "rankings/tiny-llama.json", "revision": "main", "commit": COMMIT_A}
    # The adapter's folder carries the ranking itself, byte for byte.
    assert record["ranking"]["copy"] == "ila_ranking.json"
    assert (run / "ila_ranking.json").read_bytes() == data
    # The model card transformers wrote says what the adapter covers.
    card = (run / "README.md").read_text(encoding="utf-8")
    assert "The LoRA adapter covers 8 of the 28 candidate modules, chosen by ILA layer importance" in card
    assert f"The ranking that chose them is `ila_ranking.json`, from `{hub}`" in card


@pytest.mark.e2e
def test_a_hub_ranking_missing_from_the_cache_stops_the_training_without_a_search(offline_cache, tiny_llama, tmp_path):
    cfg = make_config(tiny_llama, tmp_path, ila_ranking="hf://alice/tiny-rankings/rankings/none.json")
    result = run_train(write_config(cfg, tmp_path / "config.yml"), check=False)
    logs = result.stdout + result.stderr
    assert result.returncode != 0
    assert "ranking hf://alice/tiny-rankings/rankings/none.json: HF_HUB_OFFLINE is set" in logs
    assert "axolotl-ila search CONFIG" in logs
    assert "ILA search: warm-up" not in logs
    assert not (tmp_path / "run" / "ila_selection.json").exists()


@pytest.mark.e2e
def test_a_user_file_where_the_ranking_copy_goes_is_kept_and_the_run_stops_before_training(searched, tiny_llama, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ila_ranking.json").write_text("my notes\n")
    cfg = make_config(tiny_llama, tmp_path, ila_ranking=str(searched["ranking"]), max_steps=2)
    result = run_train(write_config(cfg, tmp_path / "config.yml"), check=False)
    assert result.returncode != 0
    assert "ILA copies the ranking a training uses into output_dir as ila_ranking.json" in result.stderr
    assert (run / "ila_ranking.json").read_text() == "my notes\n"
    assert not (run / "adapter_model.safetensors").exists()


# -- axolotl ila ------------------------------------------------------------------


def entry_point_installed() -> None:
    from importlib.metadata import entry_points

    if not any(ep.name == "ila" for ep in entry_points(group="axolotl.cli_commands")):
        pytest.fail(
            "the axolotl.cli_commands entry point `ila` is not in the installed metadata of this "
            "environment; reinstall the package (pip install -e .) after changing pyproject.toml"
        )


def python(*args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter: for what a process imports."""
    env = {**os.environ, **TEST_ENV}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def command(*args: str) -> subprocess.CompletedProcess:
    """``python ARGS`` for what a command prints (forked: conftest.run_python)."""
    return run_python(list(args), cwd=Path.cwd(), timeout=300)


def test_axolotl_help_lists_ila_loading_only_our_light_entry_module():
    """axolotl 0.19's own CLI imports torch before any plugin is looked at
    (axolotl.cli.args -> axolotl.utils.distributed), so ``axolotl --help`` has
    torch loaded whatever we do; what we control is that listing ``ila`` imports
    only our entry module, and that it needs no torch by itself."""
    entry_point_installed()
    listing = python(
        "-c",
        "import json, sys\n"
        "from axolotl.cli.main import cli\n"
        "try:\n    cli(['--help'], prog_name='axolotl')\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'axolotl_ila')))",
    )
    assert listing.returncode == 0, listing.stderr
    assert re.search(r"^  ila +Search, show, compare, combine ILA rankings\.$", listing.stdout, re.M)
    assert json.loads(listing.stdout.strip().splitlines()[-1]) == ["axolotl_ila", "axolotl_ila.cli", "axolotl_ila.cli.axolotl_group"]

    alone = python("-c", "import sys, axolotl_ila.cli.axolotl_group as c; c.ila.get_short_help_str(); print(sorted(m for m in ('torch', 'axolotl', 'transformers') if m in sys.modules))")
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout.strip() == "[]"


def test_axolotl_ila_show_prints_what_axolotl_ila_show_prints(searched):
    from axolotl.cli.art import AXOLOTL_LOGO

    entry_point_installed()
    ranking = str(searched["ranking"])
    direct = command("-m", "axolotl_ila.cli", "show", ranking, "--top", "3")
    via_axolotl = command("-m", "axolotl.cli.main", "ila", "show", ranking, "--top", "3")
    assert direct.returncode == via_axolotl.returncode == 0, via_axolotl.stderr
    # axolotl's CLI prints its logo before any of its commands runs.
    assert via_axolotl.stdout == AXOLOTL_LOGO + "\n" + direct.stdout
    assert "at drop 0.25: kept 21, dropped 7" in direct.stdout


def test_axolotl_ila_has_the_same_help_and_errors_as_axolotl_ila():
    entry_point_installed()
    for name in ("search", "show", "compare", "combine", "quickstart"):
        direct = command("-m", "axolotl_ila.cli", name, "--help")
        via_axolotl = command("-m", "axolotl.cli.main", "ila", name, "--help")
        assert direct.returncode == via_axolotl.returncode == 0
        assert via_axolotl.stdout.endswith(direct.stdout.replace("axolotl-ila", "axolotl ila"))
    group = command("-m", "axolotl.cli.main", "ila", "--help")
    for name in ("search", "show", "compare", "combine", "quickstart"):
        assert f"  {name}  " in group.stdout
    missing = command("-m", "axolotl.cli.main", "ila", "show", "/nonexistent/ranking.json")
    assert missing.returncode == 2
    assert missing.stderr.strip() == "axolotl ila: error: ranking file /nonexistent/ranking.json does not exist. Re-run `axolotl-ila search CONFIG` to make a new one, or point `ila_ranking` at a valid ranking."
