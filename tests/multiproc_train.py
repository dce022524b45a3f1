"""Test harness, never part of the plugin: ``axolotl.cli.train`` in several CPU
processes.

axolotl 0.19 puts each rank on device index LOCAL_RANK (a CUDA device) in
``normalize_config``, which fails on a machine without a GPU. This wrapper keeps
axolotl's own ``normalize_config`` and only moves the model to the CPU after it,
then runs axolotl's real train entry point, started by

    ACCELERATE_USE_CPU=true python -m torch.distributed.run --nproc_per_node 2 tests/multiproc_train.py CONFIG

(``ACCELERATE_USE_CPU``, which ``accelerate launch --cpu`` also sets, makes the
HF trainer treat the CPU ranks as one distributed run; without it every rank
would train alone although a process group exists.)

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
    import axolotl_ila.plan

    original = axolotl_ila.plan.save_ranking

    def save_ranking(*args, **kwargs):
        REPORT["save_ranking_calls"] += 1
        if os.environ.get("ILA_TEST_FAIL_WRITE") == "1":
            raise OSError("injected by the test: disk full on the writer")
        return original(*args, **kwargs)

    axolotl_ila.plan.save_ranking = save_ranking


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
    from axolotl_ila.ranking import file_digest

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
