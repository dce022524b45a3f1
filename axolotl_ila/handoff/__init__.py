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
