"""Held-out loss after equal training: ILA against all-module LoRA and the baselines."""
