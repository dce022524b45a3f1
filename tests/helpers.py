"""What the tests share: configs of tiny runs, runners for the real
``python -m axolotl.cli.train`` (one process, or two ranks), readers of what a
run leaves, and the tiny preference data. Fixtures live in ``conftest.py``."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from zygote import signal_groups

from axolotl_ila.atomic import write_jsonl
from axolotl_ila.cli.workspace import CPU_TRAINING, make_alpaca_rows
from axolotl_ila.ranking.file import Ranking, file_digest, load_ranking, save_ranking

# What a tiny model needs to train on a 2-core CPU in seconds.
CPU_SETTINGS: dict[str, Any] = {
    **CPU_TRAINING,
    "sequence_len": 128,
    "val_set_size": 0,
    "micro_batch_size": 4,
    "learning_rate": 0.002,
    "lr_scheduler": "constant",
    "logging_steps": 1,
    "seed": 1,
}


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


HARNESS = Path(__file__).with_name("multiproc_train.py")


WORLD_SIZE = 2


LAUNCH_TIMEOUT_S = 300


# What a two-rank run needs on a 2-core machine: one thread per process, one
# dataset worker, and a short search.
MULTIPROC_SETTINGS = {"dataset_processes": 1, "ila_gate_steps": 8, "ila_warmup_max_steps": 6, "max_steps": 10}


def equal_label_datasets(workspace: dict[str, Path], out: Path, rows: int = 256, length: int = 48) -> list[dict[str, str]]:
    """``datasets:`` of pre-tokenized rows that all carry ``length - 1`` label
    tokens (random ids of the workspace's vocabulary), for the tests that compare
    two ranks with one process of two accumulation steps.

    With every micro-batch holding as many label tokens as every other, how a
    trainer weighs micro-batches makes no difference, and such a test compares
    only the averaging across ranks: axolotl 0.19 weighs every micro-batch's mean
    alike, in one process or two; axolotl 0.21 weighs the label tokens of an
    accumulated batch alike, but under DDP (and DeepSpeed) each rank's own mean
    alike, as it sets average_tokens_across_devices: false."""
    import torch

    vocab_size = json.loads((workspace["model"] / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    ids = torch.randint(3, vocab_size, (rows, length), generator=torch.Generator().manual_seed(0)).tolist()
    path = out / "data" / "equal-labels.jsonl"
    write_jsonl(path, [{"input_ids": r, "attention_mask": [1] * length, "labels": r} for r in ids])
    return [{"path": str(path), "ds_type": "json", "type": "completion"}]


@dataclass
class Launch:
    returncode: int
    logs: str
    reports: dict[int, dict]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The parent's pid is the second field after the name, which is in parentheses.
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rank_environments(env: dict[str, str], port: str) -> list[dict[str, str]]:
    """Each rank's environment, as torchrun gives it to the processes it starts
    on one machine (what torch.distributed's ``env://`` and accelerate read)."""
    return [{**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
             "WORLD_SIZE": str(WORLD_SIZE), "LOCAL_WORLD_SIZE": str(WORLD_SIZE), "ROLE_WORLD_SIZE": str(WORLD_SIZE),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port} for rank in range(WORLD_SIZE)]


def launch(config: Path, launcher: str = "zygote", monitor_s: int = 2, **env_extra: str) -> Launch:
    """Start two ranks on ``config``; wait at most LAUNCH_TIMEOUT_S.

    ``launcher``: "zygote" forks both ranks from a process that has axolotl's
    training stack imported (conftest.Zygote), with the environment torchrun
    would give them; "torchrun" and "accelerate" start them through those
    launchers, as users do (two fresh interpreters each, about 15 s of imports
    apiece on this machine)."""
    reports = config.parent / f"reports-{config.stem}"
    shutil.rmtree(reports, ignore_errors=True)
    port = str(_free_port())
    env = {
        **os.environ,
        **TEST_ENV,
        # Makes the HF trainer run the CPU ranks as one distributed (DDP) run, as
        # `accelerate launch --cpu` would; without it each rank trains alone.
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "ILA_TEST_REPORT_DIR": str(reports),
        **env_extra,
    }
    if launcher == "zygote":
        envs = rank_environments(env, port)
        try:
            ranks = zygote_for(env).run([str(HARNESS), str(config)], config.parent, envs, LAUNCH_TIMEOUT_S, monitor_s)
        except subprocess.TimeoutExpired as timeout:
            pytest.fail(f"the two ranks did not finish within {LAUNCH_TIMEOUT_S} s (a rank hangs):\n"
                        f"{timeout.output[-3000:]}\n{timeout.stderr[-3000:]}")
        returncode = next((rank.returncode for rank in ranks if rank.returncode != 0), 0)
        logs = "\n".join(rank.stdout + rank.stderr for rank in ranks)
    else:
        returncode, logs = launch_through(launcher, config, env, port, monitor_s)
    found = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in reports.glob("rank-*.json")}
    return Launch(returncode, logs, found)


def launch_through(launcher: str, config: Path, env: dict[str, str], port: str, monitor_s: int) -> tuple[int, str]:
    """``torchrun`` or ``accelerate launch`` of the harness: the exit code and the merged output."""
    if launcher == "torchrun":
        # A rank that fails is reported within monitor_s; the other rank has
        # that long to reach (and report) its own error before it is stopped.
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD_SIZE}",
                   "--master_addr=127.0.0.1", f"--master_port={port}", f"--monitor_interval={monitor_s}"]
    elif launcher == "accelerate":
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={WORLD_SIZE}",
                   "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={port}"]
    else:
        raise ValueError(f"unknown launcher {launcher!r}")
    process = subprocess.Popen(
        [*command, str(HARNESS), str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=config.parent,
        start_new_session=True,  # the ranks are in its process group: one kill ends them all
    )
    try:
        logs, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # The launcher may start its ranks in sessions of their own, where a
        # kill of its process group does not reach them; they would hold the
        # output pipe open. Every descendant is killed.
        for pid in [process.pid, *descendants(process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        logs, _ = process.communicate()
        pytest.fail(f"the two ranks did not finish within {LAUNCH_TIMEOUT_S} s (a rank hangs):\n{logs[-6000:]}")
    return process.returncode, logs


def check(run: Launch, wrapped: str = "DistributedDataParallel") -> Launch:
    if run.returncode != 0:
        raise AssertionError(f"the two-rank run failed ({run.returncode}):\n{run.logs[-8000:]}")
    assert sorted(run.reports) == [0, 1], run.logs[-4000:]
    for report in run.reports.values():
        # Really one data-parallel run, not two processes training alone.
        assert report["parallel_mode"] == "ParallelMode.DISTRIBUTED" and report["world_size"] == WORLD_SIZE
        assert report["wrapped"] == wrapped
    return run


def log_lines(logs: str, text: str) -> list[str]:
    return [line for line in logs.splitlines() if text in line]


def mentions(logs: str, text: str) -> int:
    """How often the ranks logged ``text`` (two ranks' lines can share one line of the merged output)."""
    return logs.count(text)


def killed_then_resumed(config: Path, kill_after: int, launcher: str = "zygote", **env: str) -> tuple[Launch, Launch]:
    """Launch a run that searches; every rank dies (SIGKILL) once checkpoint
    ``kill_after`` is saved; launch it again. The second launch finds the ranking
    the first wrote and takes its selection from that file without searching
    (a cached ranking), checked against the recorded one, and resumes."""
    killed = launch(config, launcher=launcher, ILA_TEST_KILL_AFTER_SAVE=str(kill_after), **env)
    assert killed.returncode != 0 and not killed.reports, killed.logs[-4000:]
    assert mentions(killed.logs, "ILA search: warm-up") == WORLD_SIZE
    wrote = log_lines(killed.logs, "ILA: wrote ranking")
    assert len(wrote) == 1 and "[RANK:" not in wrote[0], wrote
    resumed = launch(config, launcher=launcher, **env)
    if resumed.returncode == 0:
        assert not log_lines(resumed.logs, "ILA search: warm-up")
        assert mentions(resumed.logs, "ILA: resuming with the selection recorded in") == WORLD_SIZE
    return killed, resumed


def check_resumed_from_the_ranking(run: Launch, ranking: Path, steps: int) -> None:
    digest = file_digest(ranking)
    for rank in (0, 1):
        assert run.reports[rank]["ranking_digest"] == digest
        assert run.reports[rank]["global_step"] == steps


def check_full_finetuning(run: Launch, ranking: Path, workspace: dict, run_dir: Path) -> None:
    """Exactly the dropped linear weights are frozen on every rank, and unchanged in the saved model."""
    names = load_ranking(ranking).names
    dropped, kept = names[21:], names[:21]
    for rank in (0, 1):
        trainable = set(run.reports[rank]["trainable"])
        assert not any(f"{name}.weight" in trainable for name in dropped)
        assert all(f"{name}.weight" in trainable for name in kept)
    base = load_tensors(workspace["model"] / "model.safetensors")
    tuned = load_tensors(run_dir / "model.safetensors")
    for name in dropped:
        assert (tuned[f"{name}.weight"] == base[f"{name}.weight"]).all(), f"{name} changed but was dropped"
    for name in kept:
        assert not (tuned[f"{name}.weight"] == base[f"{name}.weight"]).all(), f"{name} did not train"
    assert not (tuned["model.embed_tokens.weight"] == base["model.embed_tokens.weight"]).all()


# Full fine-tuning: the search (LoRA warm-up and gates), then a fresh full training.
FULL_FT = {"dataset_processes": 1, "ila_gate_steps": 4, "ila_warmup_max_steps": 4, "max_steps": 4, "learning_rate": 0.01,
           "save_strategy": "steps", "save_steps": 2, "auto_resume_from_checkpoints": True}


# FSDP2 as users configure it; SHARDED_STATE_DICT is what lets the training resume
# (and continue from the warm-up) on every rank (engines.continuation_refusal).
FSDP2 = {
    "fsdp_version": 2,
    "fsdp_config": {
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "reshard_after_forward": True,
        "state_dict_type": "SHARDED_STATE_DICT",
    },
}


def check_sharded(run: Launch, wrapped: str = "FSDPPeftModelForCausalLM") -> Launch:
    """FSDP2 wrapped the model, and every trainable weight is a DTensor (a shard per rank)."""
    check(run, wrapped=wrapped)
    for report in run.reports.values():
        assert report["trainable"] and report["sharded_trainable"] == report["trainable"]
    return run


def kept_and_dropped(ranking_path: Path) -> tuple[set[str], list[str]]:
    names = load_ranking(ranking_path).names
    return set(names[:21]), names[21:]  # drop 25% of 28


# Preference data. One file layout per family of methods, each a format axolotl
# 0.19 ships a prompt strategy for:
#   pairs (dpo, ipo, simpo: ``chatml.argilla_chat``; orpo: ``chat_template.argilla``):
#       {"chosen": [user turn, assistant turn], "rejected": [user turn, assistant turn]}
#   kto (``chatml.argilla``): {"instruction": ..., "completion": ..., "label": true|false}
PAIR_TYPES = {"dpo": "chatml.argilla_chat", "ipo": "chatml.argilla_chat", "simpo": "chatml.argilla_chat", "orpo": "chat_template.argilla"}
KTO_TYPE = "chatml.argilla"


def _prompt(row: dict[str, str]) -> str:
    return f"{row['instruction']}\n{row['input']}" if row.get("input") else row["instruction"]


def make_preference_rows(n: int, seed: int = 0) -> list[dict[str, object]]:
    """Pairs from the instruction data: the right answer is chosen, the answer
    of another instruction (a different task, so plainly wrong) is rejected."""
    rows = make_alpaca_rows(n, seed=seed)
    rng = random.Random(seed + 1)
    pairs = []
    for i, row in enumerate(rows):
        other = rows[(i + 1 + rng.randrange(n - 1)) % n] if n > 1 else row
        while other["output"] == row["output"] and n > 1:
            other = rows[rng.randrange(n)]
        user = {"role": "user", "content": _prompt(row)}
        pairs.append(
            {
                "chosen": [user, {"role": "assistant", "content": row["output"]}],
                "rejected": [user, {"role": "assistant", "content": other["output"]}],
            }
        )
    return pairs


def make_kto_rows(n: int, seed: int = 0) -> list[dict[str, object]]:
    """KTO rows (unpaired): each pair's chosen answer labelled desirable and
    its rejected answer undesirable, alternately, so both labels occur."""
    rows = []
    for i, pair in enumerate(make_preference_rows(n, seed=seed)):
        desirable = i % 2 == 0
        answer = pair["chosen" if desirable else "rejected"][1]["content"]
        rows.append({"instruction": pair["chosen"][0]["content"], "completion": answer, "label": desirable})
    return rows


def build_preference_data(root: str | Path, rows: int = 64, seed: int = 0) -> dict[str, Path]:
    """``pairs.jsonl`` (dpo, ipo, simpo, orpo) and ``kto.jsonl`` under ``root/data``."""
    root = Path(root)
    return {
        "pairs": write_jsonl(root / "data" / "pairs.jsonl", make_preference_rows(rows, seed=seed)),
        "kto": write_jsonl(root / "data" / "kto.jsonl", make_kto_rows(rows, seed=seed)),
    }


# Search records and a trainer small enough for unit tests of the certainty
# summary, the re-learning check and the gates.


def search_stage(stop: str, rho: float | None, jaccard: float | None, steps: int = 50, cap: int = 50) -> dict:
    """A search stage's record (``search.stage1`` / ``stage2``) with its last settle check."""
    last = None if rho is None else {"step": steps, "compared_with_step": steps // 2, "spearman": rho, "top75_jaccard": jaccard}
    return {"steps": steps, "max_steps": cap, "stop_reason": stop, "settle": {"agreement": 0.9, "last_check": last}}


def ranking_with_search(tmp_path, search):
    """A saved four-module ranking whose ``search`` section is ``search``."""
    model = {"base_model": "tiny", "model_type": "llama", "fingerprint": "sha256:" + "a" * 64, "num_linear_modules": 4}
    path = tmp_path / "r.json"
    save_ranking(Ranking.from_scores({f"model.layers.0.mlp.{k}": float(i) for i, k in enumerate("abcd")}, model=model, search=search), path)
    return path


class TinyTrainer:
    """What run_gates reads from a trainer: the model, a dataloader, its
    micro-batches per step (``get_batch_samples``, without a label count: the
    loss is each micro-batch's mean, as on axolotl 0.19), compute_loss."""

    def __init__(self, model, batches):
        from contextlib import nullcontext
        from types import SimpleNamespace

        self.model = model
        self.args = SimpleNamespace(gradient_accumulation_steps=1, device="cpu")
        self._batches = batches
        self.compute_loss_context_manager = nullcontext

    def get_train_dataloader(self):
        return self._batches

    def get_batch_samples(self, batches, num_batches, device):
        return [next(batches) for _ in range(num_batches)], None

    def compute_loss(self, model, batch):
        return model(**batch).loss


def tiny_lora_trainer(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from axolotl_ila.search.warmup import lora_modules
    from benchmarks.common.tiny_models import build_model

    base = build_model(tmp_path / "m", "llama", layers=1, hidden=16, vocab_size=64, initializer_range=0.2)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False))
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (4, 8, 12))
    trainer = TinyTrainer(model, [{"input_ids": t, "labels": t} for t in tokens])
    return trainer, lora_modules(model)
