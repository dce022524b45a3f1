"""One writer, every rank reads the same ranking: two real processes on gloo.

The pieces at function level (whole two-process runs of axolotl are in
``test_multiproc.py``): ``distributed.py`` and ``ranking.py`` under
``torch.distributed`` with the gloo backend, two processes started by
``torch.multiprocessing``, including cases a real run cannot easily provoke.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest

from axolotl_ila.ranking.file import ModuleScore, Ranking, file_digest, load_ranking, save_ranking
from axolotl_ila.runtime import distributed

WORLD_SIZE = 2
TIMEOUT_S = 120
FINGERPRINT = "sha256:" + "c" * 64
NAMES = [f"model.layers.{b}.{kind}" for b in range(3) for kind in ("self_attn.q_proj", "mlp.down_proj")]


def main_writes_all_read(write, read):
    """Run ``write`` on the main process only (``distributed.on_main``), then ``read`` on every process."""
    distributed.on_main(write)
    return read()


def rank_ranking(rank: int) -> Ranking:
    """Each rank scores differently (rank 1 ranks the other way round)."""
    names = NAMES if rank == 0 else list(reversed(NAMES))
    return Ranking(
        modules=[ModuleScore(name=n, score=float(len(names) - i) + rank / 10) for i, n in enumerate(names)],
        model={"base_model": "tiny/llama", "fingerprint": FINGERPRINT},
        search={"rank": rank},
    )


def _worker(rank: int, root: str, port: int) -> None:
    """Runs in each spawned process; records what happened in ``root/result-<rank>.json``."""
    import torch.distributed as dist

    root_path = Path(root)
    result: dict = {"rank": rank}
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
        result["is_main"] = distributed.is_main_process()

        # 1. Every rank computed its own ranking; only the main process writes it.
        path = root_path / "rankings" / "shared.json"
        writes = root_path / "writes"
        mine = rank_ranking(rank)

        def write() -> None:
            save_ranking(mine, path)
            writes.mkdir(exist_ok=True)
            (writes / f"rank-{rank}").write_text("written")

        loaded = main_writes_all_read(write, lambda: load_ranking(path))
        result["order"] = loaded.names
        result["search"] = loaded.search
        result["digest_agrees"] = distributed.same_on_all_ranks(file_digest(path))
        result["rank_string_agrees"] = distributed.same_on_all_ranks(f"rank-{rank}")

        # 2. The writer fails: every rank gets the error, nobody waits forever.
        reads = []

        def failing_write() -> None:
            raise OSError("disk full on the writer")

        try:
            main_writes_all_read(failing_write, lambda: reads.append(rank))
            result["failure"] = None
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            result["failure"] = f"{type(exc).__name__}: {exc}"
        result["read_after_failure"] = bool(reads)

        # 3. The writer's refusal (a ranking of another architecture in the way) too.
        other = root_path / "rankings" / "other.json"
        if rank == 0:
            foreign = rank_ranking(0)
            foreign.model = {"base_model": "other/model", "fingerprint": "sha256:" + "d" * 64}
            save_ranking(foreign, other)
        distributed.barrier()
        try:
            main_writes_all_read(lambda: save_ranking(mine, other), lambda: load_ranking(other))
            result["refusal"] = None
        except Exception as exc:  # noqa: BLE001
            result["refusal"] = f"{type(exc).__name__}: {exc}"
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the parent through the result file
        result["crash"] = traceback.format_exc()
    (root_path / f"result-{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Run the two ranks once; per-rank results by rank, and the shared folder as "root"."""
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("dist")
    context = mp.start_processes(
        _worker, args=(str(root), _free_port()), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not finish within {TIMEOUT_S} s (a rank hangs)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    out = {}
    for rank in range(WORLD_SIZE):
        data = json.loads((root / f"result-{rank}.json").read_text())
        assert "crash" not in data, data["crash"]
        out[rank] = data
    out["root"] = root
    return out


def test_exactly_one_write_by_the_main_process(results):
    assert [p.name for p in (results["root"] / "writes").iterdir()] == ["rank-0"]
    assert results[0]["is_main"] and not results[1]["is_main"]


def test_every_rank_reads_the_main_process_ranking(results):
    expected = rank_ranking(0)
    for rank in range(WORLD_SIZE):
        assert results[rank]["order"] == expected.names
        assert results[rank]["search"] == {"rank": 0}
    assert rank_ranking(1).names != expected.names  # the ranks really disagreed


def test_same_on_all_ranks(results):
    for rank in range(WORLD_SIZE):
        assert results[rank]["digest_agrees"] is True
        assert results[rank]["rank_string_agrees"] is False


def test_a_failed_write_is_raised_on_every_rank(results):
    for rank in range(WORLD_SIZE):
        failure = results[rank]["failure"]
        assert failure is not None, f"rank {rank} did not see the writer's error"
        assert failure.startswith("RuntimeError: ILA: the main process failed to write")
        assert "OSError: disk full on the writer" in failure
        assert results[rank]["read_after_failure"] is False


def test_a_refused_write_is_raised_on_every_rank(results):
    for rank in range(WORLD_SIZE):
        refusal = results[rank]["refusal"]
        assert refusal is not None and "another architecture" in refusal
    other = load_ranking(results["root"] / "rankings" / "other.json")
    assert other.model["base_model"] == "other/model"  # left alone


# -- one process, no process group -------------------------------------------------


def test_single_process_writes_then_reads(tmp_path):
    calls = []
    value = main_writes_all_read(lambda: calls.append("write"), lambda: calls.append("read") or 7)
    assert value == 7 and calls == ["write", "read"]
    assert distributed.same_on_all_ranks("anything")
    assert not distributed.is_distributed()


def test_single_process_reraises_the_original_error():
    def write():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        main_writes_all_read(write, lambda: pytest.fail("read after a failed write"))


def test_rank_from_environment_without_process_group(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert distributed.rank() == 1 and not distributed.is_main_process()
