"""The axolotl plugin: hooks only; the work lives in plan, search and application.

Hook order in ``axolotl.cli.train``:

    load_datasets     decide the selection (load the ranking, or search first, on
                      the datasets axolotl loads for this run)
    pre_model_load    same decision, for entry points that skip load_datasets
    post_model_build  the model exists, adapters do not: check it is the model the
                      plan was made for; tell PEFT to skip the dropped modules
    post_lora_load    (the search's own model only) keep PEFT's LoRA draws, which
                      post_model_load puts back if axolotl drew them again
    post_model_load   adapters exist: verify them (LoRA) or freeze the dropped
                      weights (full fine-tuning); record the selection
    add_callbacks_pre_trainer  for a training that starts from a search's warm-up
                      (now, or resumed): a callback that proves it did, before step one
    post_trainer_create  verify once more, now that the trainer holds the model;
                      give a warm-up checkpoint the training's intervals (under
                      DeepSpeed: let transformers' resume take it, zero_handoff);
                      add the selection to the model card transformers writes
    post_train        the training finished: remove a warm-up checkpoint that a
                      run without checkpoints (save_strategy: no) no longer needs

``axolotl merge-lora`` (axolotl 0.21+ only): ``post_lora_merge`` copies the
selection record and the ranking copy into the merged model's folder.

Preference training (``rl:``) applies and verifies at ``post_trainer_create``
only: there TRL has wrapped the policy (dpo, ipo, kto), and the reference model
axolotl may load through the same hooks is told apart (see ``preference``).
"""

from __future__ import annotations

import logging
from typing import Any

from axolotl.integrations.base import BasePlugin

from axolotl_ila.application import (
    ApplicationError,
    freeze_dropped,
    peft_exclude_modules,
    peft_target_parameters,
    verify_adapters,
    verify_trainable,
)
from axolotl_ila.architecture import fingerprint, model_units
from axolotl_ila.args import output_dir
from axolotl_ila.candidates import ModelInfo, keep_users_own, user_excludes
from axolotl_ila.handoff.lifecycle import align_with_training, handoff_checkpoints, remove_after_training
from axolotl_ila.handoff.verify import handoff_check_callback
from axolotl_ila.handoff.zero import install_resume, is_deepspeed_trainer
from axolotl_ila.outputs import carry_into_merged, model_card_note, write_record
from axolotl_ila.plan import Plan, kernel_warnings, resolve_plan
from axolotl_ila.preference import method, verify_reference
from axolotl_ila.record import RECORD_NAME
from axolotl_ila.runtime.distributed import is_main_process, on_main
from axolotl_ila.search.settings import IN_SEARCH_KEY
from axolotl_ila.search.warmup import PeftInit
from axolotl_ila.selection import RANKED_STRATEGIES

LOG = logging.getLogger("axolotl.ila")


def _load_datasets(cfg: Any) -> Any:
    from axolotl.common.datasets import load_datasets, load_preference_datasets

    if cfg.rl:
        return load_preference_datasets(cfg=cfg)
    return load_datasets(cfg=cfg)


class ILAPlugin(BasePlugin):
    """Train adapters only on the modules that matter (ILA, arXiv 2410.17875)."""

    def __init__(self):
        super().__init__()
        self.plan: Plan | None = None
        self._datasets: Any = None
        self._handoff_check: Any = None
        self._save_strategy: Any = None
        self._peft_init = PeftInit()  # the search's LoRA starts from PEFT's draws

    def get_input_args(self) -> str:
        return "axolotl_ila.args.ILAArgs"

    # -- deciding ----------------------------------------------------------------

    def _search(self, cfg: Any, info: ModelInfo, keep_warm_state: bool):
        from axolotl_ila.search.data import check_dataset_files, check_search_data
        from axolotl_ila.search.run import search_ranking
        from axolotl_ila.search.settings import check_search_config

        check_search_config(cfg)
        if self._datasets is None:
            check_dataset_files(cfg)
            self._datasets = _load_datasets(cfg)
        check_search_data(cfg, self._datasets)
        return search_ranking(cfg, self._datasets, info, keep_warm_state=keep_warm_state)

    def _ensure_plan(self, cfg: Any) -> Plan:
        if self.plan is None:
            self.plan = resolve_plan(cfg, run_search=self._search)
            LOG.info("%s", self.plan.selection.summary())
            for message in kernel_warnings(cfg, self.plan.selection):
                LOG.warning("%s", message)
            if self.plan.handoff_checkpoint is not None:
                # axolotl reads this when training starts (determine_last_checkpoint).
                cfg.resume_from_checkpoint = str(self.plan.handoff_checkpoint)
        return self.plan

    def load_datasets(self, cfg, preprocess: bool = False):
        if preprocess or cfg.get(IN_SEARCH_KEY):
            return None
        self._ensure_plan(cfg)
        # Datasets the search loaded are handed to axolotl; otherwise it loads them.
        datasets, self._datasets = self._datasets, None
        return datasets

    def pre_model_load(self, cfg):
        if cfg.get(IN_SEARCH_KEY):
            return
        self._ensure_plan(cfg)

    # -- applying ----------------------------------------------------------------

    def post_model_build(self, cfg, model):
        if cfg.get(IN_SEARCH_KEY):
            return
        plan = self._ensure_plan(cfg)
        built = fingerprint(model_units(model))
        if built != plan.model.fingerprint:
            raise ApplicationError(
                f"ILA: the loaded model's linear modules differ from those of its config "
                f"({cfg.base_model}); the selection was made for the config's architecture. "
                f"Is a plugin or `trust_remote_code` changing the model after loading?"
            )
        if cfg.adapter:
            keep_users_own(cfg)
            experts = set(plan.model.expert_candidates)
            dropped_modules = tuple(name for name in plan.selection.dropped if name not in experts)
            cfg.lora_exclude_modules = peft_exclude_modules(user_excludes(cfg), dropped_modules)
            kept_experts = [name for name in plan.selection.kept if name in experts]
            cfg.lora_target_parameters = peft_target_parameters(cfg, kept_experts)

    def post_lora_load(self, cfg, model):
        if cfg.get(IN_SEARCH_KEY):
            self._peft_init.take(model)

    def post_model_load(self, cfg, model):
        if cfg.get(IN_SEARCH_KEY):
            restored = self._peft_init.restore(model)
            if restored:
                LOG.info("ILA search: the warm-up starts from PEFT's LoRA initialisation (%d LoRA A matrices that axolotl drew again put back)", restored)
            return
        plan = self._ensure_plan(cfg)
        if cfg.rl:
            # This may be the reference model, and for dpo/ipo/kto the policy has
            # no adapters yet: both are handled in post_trainer_create.
            return
        if cfg.adapter:
            verify_adapters(model, plan.selection)
        else:
            freeze_dropped(model, plan.selection)
            verify_trainable(model, plan.selection)
        self._record(cfg)

    def _record(self, cfg) -> None:
        if is_main_process():
            path = write_record(self.plan, output_dir(cfg))
            LOG.info("ILA: selection recorded in %s", path)

    def add_callbacks_pre_trainer(self, cfg, model):
        if cfg.get(IN_SEARCH_KEY) or self.plan is None or not cfg.adapter:
            return []
        self._handoff_check = handoff_check_callback(output_dir(cfg), self.plan.handoff_checkpoint)
        return [self._handoff_check]

    def post_trainer_create(self, cfg, trainer):
        if cfg.get(IN_SEARCH_KEY) or self.plan is None:
            return
        if self._handoff_check is not None:
            self._handoff_check.trainer = trainer
            if is_deepspeed_trainer(trainer):
                install_resume()  # transformers' DeepSpeed resume, taught the warm-up's checkpoint
        if cfg.rl:
            self._apply_to_preference_trainer(cfg, trainer)
        elif cfg.adapter:
            verify_adapters(trainer.model, self.plan.selection)
        else:
            verify_trainable(trainer.model, self.plan.selection)
        if cfg.adapter:
            batch_size = getattr(trainer, "_train_batch_size", None)

            def align() -> None:
                for checkpoint in handoff_checkpoints(output_dir(cfg)):
                    align_with_training(checkpoint, trainer.args, batch_size)

            on_main(align)  # before the trainer loads it, on every rank
        self._save_strategy = trainer.args.save_strategy
        add_to_model_card(model_card_note(self.plan, cfg))

    def post_train(self, cfg, model):
        # axolotl calls this right after trainer.train() returns, and again at the end.
        if cfg.get(IN_SEARCH_KEY) or self.plan is None or self._save_strategy is None:
            return
        if is_main_process():
            remove_after_training(output_dir(cfg), self._save_strategy)
        self._save_strategy = None  # once

    def post_lora_merge(self, cfg, adapter_path: str, output_path: str) -> None:
        """``axolotl merge-lora`` saved the merged model (axolotl 0.21+; older
        versions have no such hook and never call it): carry the selection record
        and the ranking copy from the adapter's folder into the merged model's."""
        if not is_main_process():
            return
        written = carry_into_merged(adapter_path, output_path)
        if written:
            LOG.info("ILA: %s copied into the merged model at %s", ", ".join(p.name for p in written), output_path)
        else:
            LOG.warning(
                "ILA: %s has no %s, so the merged model at %s carries no record of which modules were trained "
                "(was the adapter trained with axolotl_ila.ILAPlugin? lora_model_dir must be the training's "
                "output_dir, where the record is written)",
                adapter_path,
                RECORD_NAME,
                output_path,
            )

    def _apply_to_preference_trainer(self, cfg, trainer) -> None:
        """The policy is ``trainer.model`` (wrapped by TRL for dpo/ipo/kto); the
        reference, if separate, ``trainer.ref_model``, which stays untouched."""
        selection = self.plan.selection
        if cfg.adapter:
            verify_adapters(trainer.model, selection)
        else:
            freeze_dropped(trainer.model, selection)
            verify_trainable(trainer.model, selection)
        reference = verify_reference(trainer, selection, method(cfg))
        LOG.info(
            "ILA: rl: %s trains %s on the %d kept modules; reference: %s",
            method(cfg),
            "LoRA" if cfg.adapter else "the weights",
            len(selection.kept),
            reference,
        )
        self._record(cfg)


CARD_START, CARD_END = "<!-- axolotl-ila -->", "<!-- /axolotl-ila -->"


def add_to_model_card(note: str) -> None:
    """Add ``note`` to the model card that transformers' Trainer writes into
    output_dir (README.md, also what ``hub_model_id`` pushes): through the text
    it puts in every card, as axolotl adds its badge and config. Replaces an
    earlier note of this process, so a second training does not stack them."""
    import transformers.modelcard as modelcard

    text = modelcard.AUTOGENERATED_TRAINER_COMMENT
    start, end = text.find(CARD_START), text.find(CARD_END)
    if start != -1 and end != -1:
        text = text[:start] + text[end + len(CARD_END) :]
    modelcard.AUTOGENERATED_TRAINER_COMMENT = f"{text.rstrip()}\n\n{CARD_START}\n{note}\n{CARD_END}\n"


def search_config_file(config_path: str) -> Plan:
    """``axolotl-ila search CONFIG``: load and validate the config as axolotl
    does, run the search it describes, and write ``ila_ranking``."""
    from axolotl.cli.config import load_cfg
    from axolotl.integrations.base import PluginManager

    cfg = load_cfg(config_path)
    plugins = [p for p in PluginManager.get_instance().plugins.values() if isinstance(p, ILAPlugin)]
    if not plugins:
        raise ValueError(f"{config_path}: add axolotl_ila.ILAPlugin to `plugins:` to search with this config.")
    if not cfg.ila_ranking:
        raise ValueError(f"{config_path}: set ila_ranking, the path the search writes its ranking to.")
    if cfg.ila_strategy not in RANKED_STRATEGIES:
        cfg.ila_strategy = "ila"  # a search makes a ranking whatever the config trains with
    plugin = plugins[0]
    plugin.plan = resolve_plan(cfg, run_search=plugin._search, force_search=True, training=False)
    return plugin.plan
