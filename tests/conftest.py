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
    """``tests/zygote.py``, one per test process, started at first use: it
    has axolotl's training stack imported and forks each command from there
    (its docstring says what that does and does not change)."""

    def __init__(self) -> None:
        self.env = {**os.environ, **TEST_ENV}
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("zygote.py"))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env,
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

    def run(self, argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        import signal
        import tempfile

        with tempfile.TemporaryDirectory(prefix="zygote-") as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            request = {"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            pid = self._read(timeout=60)["pid"]
            try:
                returncode = self._read(timeout=timeout)["returncode"]
            except subprocess.TimeoutExpired:
                os.killpg(pid, signal.SIGKILL)
                self._read(timeout=60)
                raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess([sys.executable, *argv], returncode, out.read_text(), err.read_text())


_ZYGOTE: Zygote | None = None


def without_pytest_names(env: dict[str, str]) -> dict[str, str]:
    """The environment less what pytest changes from test to test (the
    current test's name), which no import reads."""
    return {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}


def run_python(argv: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python ARGV`` (``-m module ...`` or ``-c code ...``) in ``cwd``, with
    this process's environment plus TEST_ENV and ``env``: output captured as
    text, like ``subprocess.run``. Forked from the zygote when the environment
    is the one the zygote was started with, a plain subprocess otherwise."""
    global _ZYGOTE
    wanted = {**os.environ, **TEST_ENV, **(env or {})}
    if _ZYGOTE is None:
        _ZYGOTE = Zygote()
    if without_pytest_names(wanted) == without_pytest_names(_ZYGOTE.env):
        return _ZYGOTE.run(argv, cwd, wanted, timeout)
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=wanted, cwd=cwd, timeout=timeout)


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
