"""Where a run runs: the engine (one process, DDP, FSDP2, DeepSpeed ZeRO) and
what it allows (``engines``), and the collectives every rank takes part in
(``distributed``)."""
