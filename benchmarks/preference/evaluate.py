"""DPO's implicit reward on held-out pairs, per pair.

For a pair (x, y_c, y_r) the reward of a completion is
``beta * (log pi(y | x) - log pi_ref(y | x))``, with log-probabilities summed
over the completion's tokens, and the pair is *right* when the chosen
completion's reward is higher. Reported: the reward accuracy (fraction right)
and the preference loss ``-log sigmoid(r_c - r_r)``, each per pair, so that
intervals can be bootstrapped over pairs.

Texts are built as axolotl's ``chatml.argilla_chat`` and TRL's DPO trainer
build them: the chatml prompt, the completion with ``<|im_end|>``, plus the
tokenizer's EOS token when the completion does not end with it; tokenized
without special tokens, prompt + completion, the completion's tokens being
those after the prompt's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def texts(pair: dict[str, str], eos: str) -> tuple[str, str, str]:
    prompt = f"<|im_start|>user\n{pair['prompt']}<|im_end|>\n<|im_start|>assistant\n"

    def completion(answer: str) -> str:
        text = f"{answer}<|im_end|>"
        return text if text.endswith(eos) else text + eos

    return prompt, completion(pair["chosen"]), completion(pair["rejected"])


@torch.no_grad()
def completion_logps(model: Any, tokenizer: Any, pairs: list[dict[str, str]], batch_size: int = 16) -> list[tuple[float, float]]:
    """(log p(chosen | prompt), log p(rejected | prompt)) for each pair."""
    sequences: list[tuple[list[int], int]] = []
    for pair in pairs:
        prompt, chosen, rejected = texts(pair, tokenizer.eos_token)
        prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        for completion in (chosen, rejected):
            sequences.append((tokenizer(prompt + completion, add_special_tokens=False)["input_ids"], prompt_len))
    model.eval()
    logps: list[float] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.bool)  # completion tokens
        for row, (ids, prompt_len) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            mask[row, prompt_len : len(ids)] = True
        logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        token_logps = torch.gather(F.log_softmax(logits[:, :-1], dim=-1), 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        logps += (token_logps * mask[:, 1:]).sum(dim=1).tolist()
    return [(logps[2 * i], logps[2 * i + 1]) for i in range(len(pairs))]


def load_policy(base_model: Path, adapter_dir: Path | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model, tokenizer


def pair_metrics(policy: list[tuple[float, float]], reference: list[tuple[float, float]], beta: float) -> dict[str, list[float]]:
    """Per pair: right (1/0), loss, and the reward margin r_c - r_r."""
    right, loss, margin = [], [], []
    for (pc, pr), (rc, rr) in zip(policy, reference):
        m = beta * ((pc - rc) - (pr - rr))
        margin.append(m)
        right.append(1.0 if m > 0 else 0.0)
        loss.append(-F.logsigmoid(torch.tensor(m, dtype=torch.float64)).item())
    return {"right": right, "loss": loss, "margin": margin}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def bootstrap_interval(values: list[float], samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean, resampling the values (pairs)."""
    import random

    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return means[int(0.025 * samples)], means[min(samples - 1, math.ceil(0.975 * samples) - 1)]
