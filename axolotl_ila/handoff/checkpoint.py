"""From the warm-up to the training run: the warm-up is the training's first steps.

After the gates, the training does not start again from fresh adapters (the
paper's second run). The search's warm-up state is written as an ordinary
checkpoint of the training run, ``OUTPUT_DIR/checkpoint-<step>``, holding only
what the selection keeps:

- ``adapter_model.safetensors``: the kept modules' warm-up LoRA weights;
- ``optimizer.pt``: their optimizer state (AdamW moments), in the order the
  training's optimizer will hold them (the warm-up's order, less the dropped);
- ``scheduler.pt`` and ``trainer_state.json``: the step count and the
  learning-rate schedule, which the warm-up ran with the training's settings;

and the run resumes from it with transformers' own resume (which also skips the
batches the warm-up has seen). The training model is built fresh with adapters
on the kept modules only, so after the switch no gradient or optimizer state
exists for dropped modules: memory is that of a run with a cached ranking.

The dropped modules' warm-up updates are discarded: the saved adapter must be
the whole fine-tune on its own (merging them into base weights would make the
adapter depend on a modified base model that is not saved), and
docs/one-run.md gives what discarding costs, as measured.

Under FSDP2 the LoRA weights and their AdamW moments are DTensors, each rank
holding a shard, and the engine resumes from its own checkpoint layout
(``fsdp_config.state_dict_type: SHARDED_STATE_DICT``, FSDP2's default): the
kept modules' shards are written with ``torch.distributed.checkpoint`` by every
rank into ``pytorch_model_fsdp_0/`` and ``optimizer_0/``, exactly where
accelerate's ``load_fsdp_model`` / ``load_fsdp_optimizer`` read them, and the
rest as above. ``FULL_STATE_DICT`` cannot take the handover: there the engine
saves and reloads a LoRA adapter as rank 0's shards only (accelerate's
``save_fsdp_model(adapter_only=True)`` pickles the DTensors rank 0 holds), so a
resume would not restore the warm-up on the other ranks.

Under DeepSpeed ZeRO-2 and ZeRO-3 the optimizer holds flat partitions laid out
for the warm-up's parameters, so the handover goes per parameter
(``zero_handoff``): every rank gathers each LoRA weight's fp32 master and AdamW
moments with DeepSpeed's accessors, the checkpoint holds the kept ones in
``ila_zero_state.pt`` instead of ``optimizer.pt`` (the adapter is the masters in
the model's precision), and the training's engine is given them per parameter
by a wrap of transformers' DeepSpeed resume call that takes this checkpoint and
hands every other to the original (``zero_handoff.install_resume``).

Before the training loads it, the checkpoint's ``trainer_state.json`` gets
the training's own logging, evaluation and saving intervals and batch size
(``align_with_training``): the warm-up logged every step and saved nothing.
``HandoffCheck`` verifies, once the training's optimizer exists, that the run
did start from that state (right after the search, or resumed from that
checkpoint later), and stops it loudly otherwise. Once the training has
finished, a run that saves no checkpoints (``save_strategy: "no"``) removes it
(``remove_after_training``); until then it is what a killed run resumes from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from axolotl_ila.architecture import strip_peft_prefix
from axolotl_ila.distributed import is_sharded
from axolotl_ila.ranking import write_json_atomic
from axolotl_ila.zero_handoff import ZERO_STATE_FILE, ZeroWarmState, is_deepspeed_trainer
from axolotl_ila.zero_handoff import verify as verify_zero

LOG = logging.getLogger("axolotl.ila")

HANDOFF_NAME = "ila_handoff.json"
ADAPTER_FILE = "adapter_model.safetensors"
# Where accelerate's FSDP resume reads a SHARDED_STATE_DICT checkpoint (FSDP_MODEL_NAME, OPTIMIZER_NAME).
FSDP_MODEL_DIR = "pytorch_model_fsdp_0"
FSDP_OPTIMIZER_DIR = "optimizer_0"


class HandoffError(RuntimeError):
    """The training did not start from the warm-up's state."""


def lora_module_of(param_name: str) -> str:
    """``base_model.model.<module>.lora_A.default.weight`` -> ``<module>``."""
    return strip_peft_prefix(param_name.split(".lora_")[0])


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, on the CPU. For a DTensor this is a collective: every
    rank must call it, for the same tensors in the same order."""
    tensor = tensor.detach()
    if is_sharded(tensor):
        tensor = tensor.full_tensor()
    return tensor.cpu().clone()


@dataclass
class ShardedWarmState:
    """FSDP2: this rank's shards of the warm-up's LoRA weights (PEFT's saved
    keys) and optimizer state (``get_optimizer_state_dict``: parameter names)."""

    adapter: dict[str, Any]
    optimizer: dict[str, Any]

    @classmethod
    def capture(cls, model: Any, optimizer: Any, adapter: dict[str, Any]) -> "ShardedWarmState":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=False))
        state = {
            "state": {n: {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in s.items()} for n, s in state["state"].items()},
            "param_groups": [dict(group) for group in state["param_groups"]],
        }
        return cls(adapter={k: v.detach().clone() for k, v in adapter.items()}, optimizer=state)

    def kept_only(self, kept: set[str]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        """The kept modules' shards: adapter, optimizer state dict, and the
        optimizer's parameter names in order."""
        adapter = {k: v for k, v in self.adapter.items() if lora_module_of(k) in kept}
        groups, names = [], []
        for group in self.optimizer["param_groups"]:
            members = [n for n in group["params"] if lora_module_of(n) in kept]
            names.extend(members)
            groups.append({**group, "params": members})
        state = {n: s for n, s in self.optimizer["state"].items() if lora_module_of(n) in kept}
        return adapter, {"state": state, "param_groups": groups}, names


@dataclass
class WarmState:
    """Everything the training needs from the warm-up, on the CPU."""

    step: int
    adapter: dict[str, torch.Tensor]  # PEFT's saved keys (no adapter name) -> tensor
    adapter_config: dict[str, Any]
    optimizer_groups: list[dict[str, Any]]  # hyper-parameters, and "names" instead of "params"
    optimizer_state: dict[str, dict[str, Any]]  # parameter name -> its state
    scheduler: dict[str, Any]
    trainer_state: dict[str, Any]
    sharded: ShardedWarmState | None = None  # FSDP2: this rank's shards, for the engine's resume
    zero: ZeroWarmState | None = None  # DeepSpeed ZeRO: whole fp32 weights and moments, per parameter

    @classmethod
    def capture(cls, trainer: Any) -> "WarmState":
        if is_deepspeed_trainer(trainer):
            return cls._capture_zero(trainer)
        from peft import get_peft_model_state_dict

        model = trainer.model
        peft_state = get_peft_model_state_dict(model)
        # Whole tensors on every rank (a collective under FSDP2: every rank captures).
        adapter = {k: full(v) for k, v in peft_state.items()}
        name_of = {id(p): n for n, p in model.named_parameters()}
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
        sharded = None
        if any(is_sharded(v) for v in peft_state.values()):
            sharded = ShardedWarmState.capture(model, optimizer, peft_state)
        groups, state = [], {}
        for group in optimizer.param_groups:
            names = [name_of[id(p)] for p in group["params"]]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "names": names})
            if sharded is not None:
                continue  # the optimizer state travels as shards
            for p, n in zip(group["params"], names):
                if p in optimizer.state:
                    state[n] = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in optimizer.state[p].items()}
        return cls(
            adapter=adapter,
            optimizer_groups=groups,
            optimizer_state=state,
            sharded=sharded,
            **_trainer_parts(trainer),
        )

    @classmethod
    def _capture_zero(cls, trainer: Any) -> "WarmState":
        """DeepSpeed ZeRO: every rank gathers each trainable LoRA weight's fp32
        master and moments (collectives); the adapter is the masters in the
        model's precision, which is what ZeRO copies into the model after a step."""
        zero = ZeroWarmState.capture(trainer)
        dtypes = {n: p.dtype for n, p in trainer.model.named_parameters()}
        adapter = {saved_key(n): s["fp32"].to(dtypes[n]) for n, s in zero.params.items()}
        return cls(adapter=adapter, optimizer_groups=[], optimizer_state={}, zero=zero, **_trainer_parts(trainer))

    def optimizer_state_dict(self, kept: set[str]) -> tuple[dict[str, Any], list[str]]:
        """A ``torch.optim`` state dict for the kept parameters only, numbered as
        the training's optimizer will number them; and their names, in order."""
        groups, state, names = [], {}, []
        for group in self.optimizer_groups:
            members = [n for n in group["names"] if lora_module_of(n) in kept]
            indices = list(range(len(names), len(names) + len(members)))
            for index, name in zip(indices, members):
                if name in self.optimizer_state:
                    state[index] = self.optimizer_state[name]
            names.extend(members)
            groups.append({**{k: v for k, v in group.items() if k != "names"}, "params": indices})
        return {"state": state, "param_groups": groups}, names


def saved_key(param_name: str) -> str:
    """PEFT's saved key of a LoRA weight: the parameter's name without the adapter's."""
    return param_name.replace(".default.", ".", 1)


def _trainer_parts(trainer: Any) -> dict[str, Any]:
    """The step, adapter config, scheduler and trainer state, under any engine."""
    from transformers import TrainerControl

    model = trainer.model
    trainer_state = json.loads(json.dumps(dataclasses.asdict(trainer.state), default=str))
    # The warm-up's stop flag is not the training's; the training's own
    # stateful callbacks get their fresh state at its start (HandoffCheck).
    trainer_state["stateful_callbacks"] = {"TrainerControl": TrainerControl().state()}
    trainer_state["best_model_checkpoint"] = None
    peft_config = model.peft_config[getattr(model, "active_adapter", "default")]
    return {
        "step": int(trainer.state.global_step),
        "adapter_config": json.loads(json.dumps(peft_config.to_dict(), default=list)),
        "scheduler": trainer.lr_scheduler.state_dict(),
        "trainer_state": trainer_state,
    }


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def _check_free(final: Path, output_dir: str | Path) -> None:
    if final.exists():
        raise HandoffError(
            f"{final} already exists, from an earlier run in output_dir {output_dir}; the warm-up "
            f"cannot hand over to the training there. Use a fresh output_dir, or resume that run "
            f"(auto_resume_from_checkpoints: true)."
        )


def _write_common(warm: WarmState, kept: list[str], dropped: list[str], folder: Path, exclude: Any, names: list[str]) -> None:
    """The adapter, scheduler, trainer state and handover record, into ``folder``."""
    from safetensors.torch import save_file

    kept_set = set(kept)
    adapter = {k: v.contiguous() for k, v in warm.adapter.items() if lora_module_of(k) in kept_set}
    missing = kept_set - {lora_module_of(k) for k in adapter}
    if missing:
        raise HandoffError(f"the warm-up has no LoRA weights for {len(missing)} kept modules, e.g. {sorted(missing)[0]}")
    save_file(adapter, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
    write_json_atomic(folder / "adapter_config.json", {**warm.adapter_config, "exclude_modules": exclude})
    torch.save(warm.scheduler, folder / "scheduler.pt")
    write_json_atomic(folder / "trainer_state.json", warm.trainer_state)
    write_json_atomic(
        folder / HANDOFF_NAME,
        {"step": warm.step, "kept": list(kept), "dropped": list(dropped), "optimizer_params": names},
    )


def write_checkpoint(warm: WarmState, kept: list[str], dropped: list[str], output_dir: str | Path, exclude: Any) -> Path:
    """Write the warm-up state of the kept modules as ``checkpoint-<step>``,
    atomically (a temp folder, then rename). Main process only; for a sharded
    warm-up (FSDP2) every process calls ``write_sharded_checkpoint`` instead."""
    final = checkpoint_dir(output_dir, warm.step)
    _check_free(final, output_dir)
    kept_set = set(kept)
    if warm.zero is not None:  # DeepSpeed: per-parameter state, applied by zero_handoff.apply
        optimizer = warm.zero.kept_only(lambda name: lora_module_of(name) in kept_set)
        optimizer_file, names = ZERO_STATE_FILE, list(optimizer["params"])
    else:
        optimizer, names = warm.optimizer_state_dict(kept_set)
        optimizer_file = "optimizer.pt"
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_common(warm, kept, dropped, tmp, exclude, names)
        torch.save(optimizer, tmp / optimizer_file)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_sharded_checkpoint(warm: WarmState, kept: list[str], dropped: list[str], output_dir: str | Path, exclude: Any) -> Path:
    """FSDP2: every process writes its shards of the kept modules' LoRA weights
    and optimizer state with ``torch.distributed.checkpoint``, in the layout of
    accelerate's SHARDED_STATE_DICT checkpoints; the main process adds the rest
    and renames the temp folder. Called by every process."""
    import torch.distributed.checkpoint as dcp

    from axolotl_ila.distributed import barrier, on_main

    assert warm.sharded is not None
    final = checkpoint_dir(output_dir, warm.step)
    tmp = final.with_name(f".{final.name}.sharded.tmp")  # one name for every rank

    def prepare() -> None:
        _check_free(final, output_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    on_main(prepare)  # the main process's error stops every rank
    adapter, optimizer, names = warm.sharded.kept_only(set(kept))
    try:
        dcp.save({"model": adapter}, storage_writer=dcp.FileSystemWriter(str(tmp / FSDP_MODEL_DIR)))
        dcp.save({"optimizer": optimizer}, storage_writer=dcp.FileSystemWriter(str(tmp / FSDP_OPTIMIZER_DIR)))
    finally:
        barrier()

    def finish() -> None:
        try:
            _write_common(warm, kept, dropped, tmp, exclude, names)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    on_main(finish)
    return final


def handoff_checkpoints(output_dir: str | Path) -> list[Path]:
    """The warm-up checkpoints in ``output_dir``: ``checkpoint-<k>`` folders that
    hold our ``ila_handoff.json`` for that very step (the training's own
    checkpoints have none)."""
    found = []
    for folder in sorted(Path(output_dir).glob("checkpoint-*")):
        step = folder.name.rsplit("-", 1)[-1]
        marker = folder / HANDOFF_NAME
        if not (step.isdigit() and marker.is_file()):
            continue
        try:
            recorded = json.loads(marker.read_text(encoding="utf-8")).get("step")
        except (OSError, ValueError, AttributeError):
            continue
        if recorded == int(step):
            found.append(folder)
    return found


def align_with_training(checkpoint: Path, args: Any, train_batch_size: int | None) -> None:
    """Make the checkpoint's trainer state say what the training's own would:
    its logging, evaluation and saving intervals, as transformers computes them
    (``TrainerState.compute_steps``), and its batch size. Otherwise resuming from
    it warns that "the following arguments do not match the ones in the
    trainer_state.json" (the warm-up logged every step). Main process only."""
    from transformers import TrainerState

    path = checkpoint / "trainer_state.json"
    state = TrainerState.load_from_json(str(path))
    state.compute_steps(args, state.max_steps)  # the warm-up kept the training's max_steps
    if train_batch_size is not None:
        state.train_batch_size = train_batch_size
    write_json_atomic(path, dataclasses.asdict(state))


def remove_after_training(output_dir: str | Path, save_strategy: Any) -> list[Path]:
    """After a finished training: remove the warm-up checkpoints of a run that
    saves none of its own, where they are only optimizer state nobody asked for.
    With checkpoints on they stay, as the run's first. Main process only."""
    removed = []
    for checkpoint in handoff_checkpoints(output_dir):
        if str(getattr(save_strategy, "value", save_strategy)).lower() != "no":
            LOG.info(
                "ILA: keeping the warm-up's checkpoint %s as the run's first checkpoint (save_strategy: %s)",
                checkpoint,
                getattr(save_strategy, "value", save_strategy),
            )
            continue
        shutil.rmtree(checkpoint)
        removed.append(checkpoint)
        LOG.info(
            "ILA: removed the warm-up's checkpoint %s: the training finished and saves no checkpoints "
            "(save_strategy: no), so nothing resumes from it",
            checkpoint,
        )
    return removed


def handoff_check_callback(output_dir: str | Path, expected: str | Path | None):
    """A trainer callback for runs that start from a warm-up's checkpoint: right
    after this run's search (``expected``), or resumed later from it.

    Before the first step it gives the trainer state the training's stateful
    callbacks (the warm-up ran without them), and proves that the run did
    start from the warm-up: step count, kept adapters' weights, and the
    optimizer holding its state in the warm-up's order. Give it the trainer
    (``.trainer``) once it exists."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    output_dir = Path(output_dir)

    class HandoffCheck(TrainerCallback):
        trainer: Any = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            checkpoint = checkpoint_dir(output_dir, state.global_step)
            if expected is not None and checkpoint != Path(expected):
                raise HandoffError(
                    f"ILA: the training should continue from the warm-up ({expected}) but starts at step "
                    f"{state.global_step}; was resume_from_checkpoint changed by another plugin? Set "
                    f"ila_continue: false to train from fresh adapters."
                )
            if state.global_step == 0 or not (checkpoint / HANDOFF_NAME).exists():
                return  # not a warm-up's checkpoint: an ordinary start or resume
            if self.trainer is not None:
                for callback in self.trainer.callback_handler.callbacks + [self.trainer.control]:
                    if isinstance(callback, ExportableState):
                        state.stateful_callbacks.setdefault(type(callback).__name__, callback.state())
            deepspeed = self.trainer is not None and is_deepspeed_trainer(self.trainer)
            if (checkpoint / ZERO_STATE_FILE).is_file() != deepspeed:
                raise HandoffError(
                    f"ILA: the warm-up's checkpoint {checkpoint} was written {'with' if not deepspeed else 'without'} "
                    f"DeepSpeed and this run trains {'with' if deepspeed else 'without'} it; its state cannot be "
                    f"handed over across engines. Resume with the warm-up's engine, or use a fresh output_dir."
                )
            if deepspeed:
                verify_zero(self.trainer.model_wrapped, checkpoint)  # weights, moments, step counts
                return
            record = json.loads((checkpoint / HANDOFF_NAME).read_text(encoding="utf-8"))
            params = dict(model.named_parameters())
            by_saved_key = {k.replace(".default.", ".", 1): p for k, p in params.items() if ".lora_" in k}
            saved = load_file(str(checkpoint / ADAPTER_FILE))
            for key, tensor in saved.items():  # the file's order: the same on every rank
                param = by_saved_key.get(key)
                if param is None or not torch.equal(full(param).to(tensor.dtype), tensor):
                    raise HandoffError(
                        f"ILA: the training's LoRA weight {key} is not the warm-up's ({checkpoint}); the "
                        f"handover failed. Set ila_continue: false to train from fresh adapters."
                    )
            inner = getattr(optimizer, "optimizer", optimizer)
            name_of = {id(p): n for n, p in params.items()}
            order = [name_of.get(id(p)) for group in inner.param_groups for p in group["params"]]
            if order != record["optimizer_params"]:
                raise HandoffError(
                    f"ILA: the training's optimizer holds its parameters in another order than the "
                    f"warm-up's ({checkpoint}), so their AdamW state would be mixed up. Set "
                    f"ila_continue: false to train from fresh adapters."
                )

    return HandoffCheck()
