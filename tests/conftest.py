"""Shared fixtures: tiny local models and data, and a runner for the real
``python -m axolotl.cli.train``. Nothing is downloaded."""

from __future__ import annotations

import os

# The suite runs on two xdist workers (pyproject's addopts); each worker, and
# every training it starts, uses one thread, or two torch jobs on two cores
# slow each other down many times over.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from axolotl_ila.tiny import build_workspace
from zygote import signal_groups

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# What a tiny model needs to train on a 2-core CPU in seconds.
CPU_SETTINGS: dict[str, Any] = {
    "sequence_len": 128,
    "sample_packing": False,
    "val_set_size": 0,
    "micro_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 0.002,
    "optimizer": "adamw_torch",
    "lr_scheduler": "constant",
    "bf16": False,
    "fp16": False,
    "tf32": False,
    "save_strategy": "no",
    "logging_steps": 1,
    "seed": 1,
    "lora_mlp_kernel": False,
    "lora_qkv_kernel": False,
    "lora_o_kernel": False,
}


# The files that take longest, longest first (summed test time of a full run on
# the 2-core VM). pytest-xdist's ``--dist loadfile`` hands a worker a whole file
# each time it runs short of work, in collection order (pyproject's addopts turn
# off its own reordering, by number of tests); started first, the long files
# cannot be left to one worker alone at the end while the other idles.
LONGEST_FIRST = [
    "test_multiproc.py", "test_deepspeed.py", "test_planted.py", "test_continue.py", "test_e2e_train.py",
    "test_preference.py", "test_sharing.py", "test_retention_bench.py", "test_bad_input.py", "test_cli.py",
    "test_model_families.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> dict[str, Path]:
    return build_workspace(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def tiny_neox(tmp_path_factory) -> dict[str, Path]:
    return build_workspace(tmp_path_factory.mktemp("neox"), "gpt_neox")


@pytest.fixture(scope="session")
def searched(tiny_llama, tmp_path_factory) -> dict[str, Any]:
    """One real training run with no ranking present: it searches, writes the
    ranking (and its heatmap), then trains. Shared by the tests that need a
    ranking made by the real search."""
    out = tmp_path_factory.mktemp("searched")
    ranking = out / "rankings" / "tiny-llama.json"
    cfg = make_config(tiny_llama, out, ila_ranking=str(ranking), ila_gate_steps=16)
    result = run_train(write_config(cfg, out / "config.yml"))
    return {"out": out, "ranking": ranking, "result": result, "cfg": cfg}


def make_config(workspace: dict[str, Path], out: Path, adapter: str | None = "lora", **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "base_model": str(workspace["model"]),
        "datasets": [{"path": str(workspace["data"]), "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str(out / "prepared"),
        "output_dir": str(out / "run"),
        "max_steps": 20,
        "plugins": ["axolotl_ila.ILAPlugin"],
        **CPU_SETTINGS,
    }
    if adapter:
        cfg.update(adapter=adapter, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_linear=True)
    if adapter == "qlora":
        cfg["load_in_4bit"] = True
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


def write_config(cfg: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


TEST_ENV = {"AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


class Zygote:
    """``tests/zygote.py``, started with one environment: it has axolotl's
    training stack imported and forks each command from there (its docstring
    says what that does and does not change)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("zygote.py"))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        ready = self._read(timeout=600)
        if not ready.get("ready"):
            raise RuntimeError(f"tests/zygote.py did not start: {ready}")

    def _read(self, timeout: float) -> dict:
        import select

        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not readable:
            raise subprocess.TimeoutExpired(self.process.args, timeout)
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"tests/zygote.py exited ({self.process.wait()})")
        return json.loads(line)

    def run(self, argv: list[str], cwd: Path, envs: list[dict[str, str]], timeout: float,
            monitor_s: float = 0) -> list[subprocess.CompletedProcess]:
        """One child per environment in ``envs``, all started at once; each
        one's exit code and output (see the zygote's docstring for what
        happens when one of them fails)."""
        import signal
        import tempfile

        with tempfile.TemporaryDirectory(prefix="zygote-") as folder:
            files = [(Path(folder) / f"stdout-{i}", Path(folder) / f"stderr-{i}") for i in range(len(envs))]
            children = [{"env": env, "stdout": str(out), "stderr": str(err)} for env, (out, err) in zip(envs, files)]
            request = {"argv": argv, "cwd": str(cwd), "children": children, "monitor_s": monitor_s}
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            pids = self._read(timeout=60)["pids"]

            def output() -> list[tuple[str, str]]:
                return [(out.read_text(), err.read_text()) for out, err in files]

            try:
                returncodes = self._read(timeout=timeout)["returncodes"]
            except subprocess.TimeoutExpired:
                signal_groups(pids, signal.SIGKILL)
                self._read(timeout=60)
                stdout, stderr = ("\n".join(parts) for parts in zip(*output()))
                raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, stdout, stderr)
            return [subprocess.CompletedProcess([sys.executable, *argv], code, out, err)
                    for code, (out, err) in zip(returncodes, output())]

    def close(self) -> None:
        self.process.stdin.close()  # end of input ends it
        self.process.wait(timeout=60)


# Zygotes by environment, least recently used first; at most two live (each
# holds a few hundred MB): the suite's usual environment, and one a test set.
_ZYGOTES: dict[tuple, Zygote] = {}

# What a launcher sets per rank (as torchrun does) or what a test sets per run
# for its own harness; read when a run starts, never when a module is imported.
PER_RUN_NAMES = {
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
    "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU", "ILA_TEST_REPORT_DIR", "ILA_TEST_KILL_AFTER_SAVE",
    "ILA_TEST_FAIL_WRITE", "PYTEST_CURRENT_TEST",
}


def import_time_environment(env: dict[str, str]) -> tuple:
    """What of ``env`` a zygote must have had when it imported: all of it but
    PER_RUN_NAMES (pytest's current test name among them)."""
    return tuple(sorted((k, v) for k, v in env.items() if k not in PER_RUN_NAMES))


def zygote_for(env: dict[str, str]) -> Zygote:
    """A zygote whose imports saw ``env`` (started if none is live)."""
    key = import_time_environment(env)
    zygote = _ZYGOTES.pop(key, None)
    if zygote is None:
        if len(_ZYGOTES) >= 2:
            _ZYGOTES.pop(next(iter(_ZYGOTES))).close()
        zygote = Zygote(dict(key))
    _ZYGOTES[key] = zygote
    return zygote


def run_python(argv: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python ARGV`` (``-m module ...``, ``-c code ...`` or ``script ...``)
    in ``cwd``, with this process's environment plus TEST_ENV and ``env``:
    output captured as text, like ``subprocess.run``. Forked from a zygote
    started with that same environment (modules read some variables when
    imported)."""
    wanted = {**os.environ, **TEST_ENV, **(env or {})}
    return zygote_for(wanted).run(argv, cwd, [wanted], timeout)[0]


def run_train(config: Path, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real ``python -m axolotl.cli.train CONFIG``, in a fresh process
    (forked from the zygote: ``run_python``)."""
    result = run_python(["-m", "axolotl.cli.train", str(config)], cwd=config.parent, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def adapter_modules(output_dir: Path) -> set[str]:
    """Base-model names of the modules that have saved LoRA weights."""
    from safetensors import safe_open

    names = set()
    with safe_open(str(output_dir / "adapter_model.safetensors"), "pt") as handle:
        for key in handle.keys():
            if ".lora_A." in key or ".lora_B." in key:
                name = key.split(".lora_")[0]
                names.add(name.removeprefix("base_model.model."))
    return names


def load_tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
