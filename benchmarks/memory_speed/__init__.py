"""Memory and step time of all-module LoRA against ILA's selections."""
