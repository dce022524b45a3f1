"""Proof, before the training's first step, that it did start from the
warm-up's state (right after the search, or resumed from its checkpoint)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from axolotl_ila.handoff.names import ADAPTER_FILE, HANDOFF_NAME, HandoffError, checkpoint_dir
from axolotl_ila.handoff.state import full
from axolotl_ila.handoff.zero import ZERO_STATE_FILE, is_deepspeed_trainer
from axolotl_ila.handoff.zero import verify as verify_zero

LOG = logging.getLogger("axolotl.ila")


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
