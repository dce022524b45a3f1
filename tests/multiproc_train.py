"""Test harness, never part of the plugin: ``axolotl.cli.train`` in several CPU
processes.

axolotl 0.19 puts each rank on device index LOCAL_RANK (a CUDA device) in
``normalize_config``, which fails on a machine without a GPU. This wrapper keeps
axolotl's own ``normalize_config`` and only moves the model to the CPU after it,
then runs axolotl's real train entry point, started by

    ACCELERATE_USE_CPU=true python -m torch.distributed.run --nproc_per_node 2 tests/multiproc_train.py CONFIG

(or with its two ranks forked from ``tests/zygote.py``, which gives them the
same environment; ``test_multiproc.launch``).

(``ACCELERATE_USE_CPU``, which ``accelerate launch --cpu`` also sets, makes the
HF trainer treat the CPU ranks as one distributed run; without it every rank
would train alone although a process group exists.)

DeepSpeed (``deepspeed:``, started with ``ACCELERATE_USE_CPU=false``) needs one
more: accelerate starts DeepSpeed only on ranks it does not treat as CPU ranks,
and gives a rank without an accelerator no backend (here: gloo, on which
accelerate itself starts DeepSpeed; DeepSpeed's CPU accelerator does the rest).
It also skips building DeepSpeed's shared-memory comm op, which only inference
uses (``_no_shm_comm_op``).

With PyPI's CUDA build of torch (and no GPU), axolotl's check for GPU P2P
support before training needs the answer the CPU build gives (``_cpu_p2p_check``).

FSDP2 (``fsdp_version: 2``) needs three more redirections, each only of where
things live, never of what axolotl or accelerate do with them: axolotl builds
its device mesh for "cuda" (here: "cpu", gloo); accelerate makes CPU ranks
``MULTI_CPU`` (DDP) even when axolotl asks for FSDP (here: the FSDP run axolotl
configured); and axolotl loads a QLoRA model for FSDP onto CUDA device
LOCAL_RANK (here: the CPU).

For the tests, each rank also writes what it saw to ``$ILA_TEST_REPORT_DIR/rank-<rank>.json``,
and two faults can be injected:

- ``ILA_TEST_FAIL_WRITE=1``: writing the ranking fails on the main process only.
- ``ILA_TEST_KILL_AFTER_SAVE=N``: once checkpoint N is saved on every rank,
  every rank kills itself (SIGKILL), as a preempted job would die.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

REPORT: dict[str, Any] = {"save_ranking_calls": 0}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _cpu_normalize_config(original):
    def normalize_config(cfg):
        original(cfg)
        cfg.device_map = {"": "cpu"}

    return normalize_config


def _cpu_device_mesh() -> None:
    """FSDP2: axolotl builds its parallelism mesh with ``build_device_mesh("cuda")``
    (``axolotl.utils.distributed.build_parallelism_config``); on CPU ranks the
    mesh is a gloo ``"cpu"`` mesh, as accelerate's own CPU path builds it."""
    from accelerate.parallelism_config import ParallelismConfig

    original = ParallelismConfig.build_device_mesh

    def build_device_mesh(self, device_type: str):
        return original(self, "cpu")

    ParallelismConfig.build_device_mesh = build_device_mesh


def _cpu_qlora_fsdp_device_map() -> None:
    """QLoRA under FSDP: axolotl's model loader puts the 4-bit model on device
    LOCAL_RANK (a CUDA index) whatever ``cfg.device_map`` says; here, the CPU."""
    from axolotl.loaders.model import ModelLoader

    original = ModelLoader._set_device_map_config

    def _set_device_map_config(self):
        original(self)
        if isinstance(self.model_kwargs.get("device_map"), dict):
            self.model_kwargs["device_map"] = {"": "cpu"}

    ModelLoader._set_device_map_config = _set_device_map_config


def _cpu_fsdp() -> None:
    """accelerate makes a run FSDP only on GPU-like ranks: with ``cpu`` (which
    ``ACCELERATE_USE_CPU`` sets) the ranks stay ``MULTI_CPU`` and the model would
    be wrapped in DDP although axolotl asked for FSDP (``ACCELERATE_USE_FSDP``).
    Here the CPU ranks become the FSDP run axolotl configured; FSDP2's
    ``fully_shard`` on a ``"cpu"`` mesh runs with gloo."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if wants_fsdp and fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # As accelerate records it, so that later AcceleratorState() calls keep it.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = __init__


def _cpu_deepspeed() -> None:
    """DeepSpeed: accelerate starts DeepSpeed only on ranks that are not ``cpu``
    (``PartialState.__init__``), and a rank that is neither ``cpu`` nor on an
    accelerator gets no backend at all (``_prepare_backend`` returns ``None``,
    and the run becomes one process). Here a DeepSpeed run's CPU ranks get the
    backend accelerate gives CPU ranks (gloo, ``MULTI_CPU``), so that accelerate
    itself starts DeepSpeed on them (``deepspeed.comm.init_distributed``) and
    makes the run ``DEEPSPEED``; DeepSpeed's own CPU accelerator runs the engine."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        found, kind = original(self, cpu, sagemaker_dp, backend)
        wants_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        if wants_deepspeed and not cpu and found is None and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return found, kind

    PartialState._prepare_backend = _prepare_backend


def _no_shm_comm_op() -> None:
    """DeepSpeed: on a CPU accelerator its comm backend builds a shared-memory C++
    op at start (``deepspeed.comm.torch.build_shm_op``: a compiler and ~90 s on
    the first start). The op serves only ``inference_all_reduce``, which training
    never calls (``all_reduce`` goes to torch.distributed, here gloo); without it
    DeepSpeed takes that path for inference too. So CI needs no C++ compiler."""
    import importlib

    # The module itself: the package's ``deepspeed.comm.torch`` attribute is the torch package.
    backend = importlib.import_module("deepspeed.comm.torch")
    backend.build_shm_op = lambda: None


def _cpu_p2p_check() -> None:
    """Every run: before training, axolotl asks whether rank LOCAL_RANK's GPU can
    reach a peer GPU (``prepare_optim_env`` -> ``check_cuda_p2p_ib_support`` ->
    ``check_cuda_p2p_support`` -> ``torch.cuda.can_device_access_peer``). With a
    CPU build of torch (the 3.11 leg) that query raises the AssertionError axolotl
    catches and reads as "P2P fine"; with PyPI's CUDA build and no GPU (the 3.12
    leg) it raises "Found no NVIDIA driver", which stops every rank. On ranks that
    have no CUDA device, the answer here is the CPU build's: there is no GPU peer
    whose P2P could be broken (it would only set NCCL_P2P_DISABLE, which gloo
    ignores)."""
    import torch

    import axolotl.utils.environment

    original = axolotl.utils.environment.check_cuda_p2p_support

    def check_cuda_p2p_support() -> bool:
        if torch.cuda.device_count() == 0:
            return True
        return original()

    # check_cuda_p2p_ib_support calls the module's global by name.
    axolotl.utils.environment.check_cuda_p2p_support = check_cuda_p2p_support


def _config_uses_deepspeed(config: str) -> bool:
    import yaml

    from axolotl_ila.runtime.engines import engine

    return engine(yaml.safe_load(Path(config).read_text(encoding="utf-8"))) == "deepspeed"


def _load_indexed_cpu_locations() -> None:
    """Resuming: the HF trainer loads the optimizer state with ``map_location=args.device``,
    which accelerate gives as ``cpu:<rank>`` on several CPU processes; ``torch.load``
    only knows ``cpu``. Only a CPU run meets this, so the harness teaches torch the name."""
    import torch.serialization

    def tag(obj):
        return None

    def restore(obj, location):
        return obj if location.startswith("cpu:") else None

    torch.serialization.register_package(5, tag, restore)


def _count_ranking_writes() -> None:
    import axolotl_ila.outputs

    original = axolotl_ila.outputs.save_ranking

    def save_ranking(*args, **kwargs):
        REPORT["save_ranking_calls"] += 1
        if os.environ.get("ILA_TEST_FAIL_WRITE") == "1":
            raise OSError("injected by the test: disk full on the writer")
        return original(*args, **kwargs)

    axolotl_ila.outputs.save_ranking = save_ranking


def _kill_after_save(step: int):
    from transformers import TrainerCallback

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= step:
                import torch.distributed as dist

                dist.barrier()  # every rank has finished writing the checkpoint
                os.kill(os.getpid(), signal.SIGKILL)

    return KillAfterSave()


def _watch_trainer() -> None:
    """Keep the trainer the plugin verifies, to report what each rank trains."""
    from axolotl_ila.plugin import ILAPlugin

    original = ILAPlugin.post_trainer_create

    def post_trainer_create(self, cfg, trainer):
        original(self, cfg, trainer)
        REPORT["trainer"] = trainer
        if os.environ.get("ILA_TEST_KILL_AFTER_SAVE"):
            trainer.add_callback(_kill_after_save(int(os.environ["ILA_TEST_KILL_AFTER_SAVE"])))

    ILAPlugin.post_trainer_create = post_trainer_create


def _describe(error: str | None) -> dict[str, Any]:
    from axolotl.integrations.base import PluginManager

    from axolotl_ila.application import adapted_modules
    from axolotl_ila.plugin import ILAPlugin
    from axolotl_ila.ranking.file import file_digest
    from axolotl_ila.runtime.distributed import is_zero3_partitioned

    out: dict[str, Any] = {"rank": _rank(), "error": error, "save_ranking_calls": REPORT["save_ranking_calls"]}
    plugin = next((p for p in PluginManager.get_instance().plugins.values() if isinstance(p, ILAPlugin)), None)
    plan = plugin.plan if plugin is not None else None
    out["plan"] = plan.record() if plan is not None else None
    ranking = (plan.ranking_identity or {}).get("path") if plan is not None else None
    out["ranking_digest"] = file_digest(ranking) if ranking and Path(ranking).exists() else None
    trainer = REPORT.get("trainer")
    if trainer is not None:
        out["parallel_mode"] = str(trainer.args.parallel_mode)
        out["world_size"] = trainer.args.world_size
        out["wrapped"] = type(trainer.model_wrapped).__name__
        out["global_step"] = trainer.state.global_step
        out["adapted"] = sorted(adapted_modules(trainer.model))
        out["sharded_trainable"] = sorted(
            name for name, param in trainer.model.named_parameters()
            if param.requires_grad and type(param.data).__name__ == "DTensor"
        )
        engine = trainer.model_wrapped
        out["zero_stage"] = engine.zero_optimization_stage() if type(engine).__name__ == "DeepSpeedEngine" else None
        # ZeRO-3: outside a forward each rank holds only its partition, the parameter itself is empty.
        out["zero3_partitioned_trainable"] = sorted(
            name for name, param in trainer.model.named_parameters()
            if param.requires_grad and is_zero3_partitioned(param) and param.numel() == 0 and param.ds_numel > 0
        )
        out["four_bit_linears"] = sum(type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit" for m in trainer.model.modules())
        out["trainable"] = sorted(
            name for name, param in trainer.model.named_parameters() if param.requires_grad
        )
    return out


def _write_report(error: str | None) -> None:
    folder = os.environ.get("ILA_TEST_REPORT_DIR")
    if not folder:
        return
    path = Path(folder) / f"rank-{_rank()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_describe(error), indent=1), encoding="utf-8")
    tmp.replace(path)


def main(config: str) -> None:
    import axolotl.cli.config
    import axolotl.utils.config

    # load_cfg calls the name it imported into axolotl.cli.config; patch both.
    patched = _cpu_normalize_config(axolotl.utils.config.normalize_config)
    axolotl.utils.config.normalize_config = patched
    axolotl.cli.config.normalize_config = patched
    _cpu_p2p_check()
    _cpu_device_mesh()
    _cpu_fsdp()
    _cpu_qlora_fsdp_device_map()
    _cpu_deepspeed()
    if _config_uses_deepspeed(config):  # importing DeepSpeed costs seconds: only where it runs
        _no_shm_comm_op()
    _load_indexed_cpu_locations()
    _count_ranking_writes()
    _watch_trainer()

    from axolotl.cli.train import do_cli

    try:
        do_cli(config=config)
    except BaseException as exc:
        _write_report(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise
    _write_report(None)


if __name__ == "__main__":
    main(sys.argv[1])
