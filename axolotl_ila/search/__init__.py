"""The ILA search, stage by stage: what a search runs with (``settings``) and
on (``data``), the warm-up with its probes (``warmup``), the re-learning check
(``relearn``), the gates (``gates``, on LoRA's update: ``lora_update``), how
settled the ranking is (``certainty``); ``run`` tells the whole story."""
