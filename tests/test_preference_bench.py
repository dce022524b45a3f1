"""The preference study's pieces (benchmarks/preference): pairs from each
source, the texts scored, the per-pair DPO metrics and their intervals."""

from __future__ import annotations

import math
import random

import pytest
import torch

from benchmarks.preference import data
from benchmarks.preference.evaluate import bootstrap_interval, completion_logps, pair_metrics, texts


def test_each_source_becomes_a_pair_of_its_right_and_a_wrong_answer():
    rng = random.Random(0)
    sciq = {"question": "Which gas do plants take in?", "correct_answer": "carbon dioxide", "distractor1": "helium", "distractor2": "neon", "distractor3": "argon"}
    pair = data.sciq(sciq, rng)
    assert pair["prompt"] == sciq["question"] and pair["chosen"] == "carbon dioxide" and pair["rejected"] in ("helium", "neon", "argon")
    siqa = {"context": "Kai won.", "question": "How does Kai feel?", "answerA": "sad", "answerB": "happy", "answerC": "bored", "label": "2"}
    pair = data.social_i_qa(siqa, rng)
    assert pair["prompt"] == "Kai won. How does Kai feel?" and pair["chosen"] == "happy" and pair["rejected"] in ("sad", "bored")
    obqa = {"question_stem": "The sun is a", "choices": "{'text': ['star', 'planet'], 'label': ['A', 'B']}", "answerKey": "A"}
    assert data.openbookqa(obqa, rng) == {"prompt": "The sun is a", "chosen": "star", "rejected": "planet"}
    piqa = {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "bite the lid", "label": "0"}
    assert data.piqa(piqa, rng) == {"prompt": "How would you do this? Open a jar", "chosen": "twist the lid", "rejected": "bite the lid"}


def test_texts_are_the_chatml_strings_dpo_trains_on():
    prompt, chosen, rejected = texts({"prompt": "Q?", "chosen": "yes", "rejected": "no"}, eos="<|im_start|>")
    assert prompt == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert chosen == "yes<|im_end|><|im_start|>" and rejected == "no<|im_end|><|im_start|>"
    assert texts({"prompt": "Q?", "chosen": "yes", "rejected": "no"}, eos="<|im_end|>")[1] == "yes<|im_end|>"


def test_pair_metrics_follow_the_dpo_reward():
    # policy - reference log-ratio: chosen +2, rejected -1 -> margin beta * 3
    metrics = pair_metrics([(-1.0, -4.0), (-5.0, -1.0)], [(-3.0, -3.0), (-3.0, -3.0)], beta=0.1)
    assert metrics["right"] == [1.0, 0.0]
    assert metrics["margin"] == pytest.approx([0.3, -0.4])
    assert metrics["loss"][0] == pytest.approx(-math.log(1 / (1 + math.exp(-0.3))))


def test_the_bootstrap_interval_holds_the_mean_and_narrows_with_more_pairs():
    rng = random.Random(1)
    values = [rng.random() for _ in range(400)]
    low, high = bootstrap_interval(values)
    assert low < sum(values) / len(values) < high
    narrow = bootstrap_interval(values * 4)
    assert narrow[1] - narrow[0] < high - low


def test_completion_log_probabilities_count_only_the_completion(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama["model"]))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama["model"]))
    pairs = [{"prompt": "Reverse the words.", "chosen": "ball a sees cat the", "rejected": "the cat sees a ball"}]
    (chosen, rejected), = completion_logps(model, tokenizer, pairs)
    # The same completion after a longer prompt: only its own tokens are summed, batch padding changes nothing.
    (alone_chosen, _), = completion_logps(model, tokenizer, pairs, batch_size=1)
    assert chosen == pytest.approx(alone_chosen, abs=1e-4)
    prompt, completion, _ = texts(pairs[0], tokenizer.eos_token)
    ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = sum(float(logits[i - 1, ids[i]]) for i in range(start, len(ids)))
    assert chosen == pytest.approx(expected, abs=1e-4) and chosen != rejected
