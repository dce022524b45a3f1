"""Planted tasks: a teacher is a tiny base model plus low-rank deltas in a few
chosen modules, the data are its samples, and the truth is measured.

A search on the base should rank modules so that LoRA on its top k (k = the
number of planted modules) trains as well as LoRA on the planted modules, in
the steps the run has. Planted modules are no answer key: their deltas can
matter very unequally, and LoRA on another module can train better within a
run's steps. So a task measures, rather than assumes:

- each planted delta's weight in the teacher: the KL (nats/token, on held-out
  teacher samples) of reverting that delta alone, and of reverting all of them;
- the held-out loss of LoRA on the planted set, trained for the task's planned
  steps (``train_lora``), which a ranking's top k is compared with: its
  *keep-k regret* is the top k's held-out loss minus the planted set's
  (negative: better than the truth).

Everything is built locally and runs in seconds to a minute on one CPU thread.
Used by the tests and by ``benchmarks/planted``.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from axolotl_ila.atomic import write_jsonl
from axolotl_ila.cli.workspace import CPU_TRAINING, build_tokenizer, make_alpaca_rows
from benchmarks.common.tiny_models import build_model

FAMILIES = ("llama", "qwen2", "mistral", "gpt_neox")

# The linear modules of one block, per family, with the block prefix.
_BLOCK = {
    "llama": ("model.layers", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    "gpt_neox": ("gpt_neox.layers", ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
}
_BLOCK["qwen2"] = _BLOCK["mistral"] = _BLOCK["llama"]


def candidate_modules(family: str, layers: int) -> list[str]:
    """Every linear module of the blocks, in model order (``lora_target_linear``'s candidates)."""
    if family not in _BLOCK:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    prefix, kinds = _BLOCK[family]
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in kinds]


@dataclass(frozen=True)
class PlantedTask:
    """One task: the base model, where the deltas are and how large, and the run."""

    family: str
    layers: int
    planted: tuple[str, ...]  # module names, the base model's own
    delta_rank: int
    delta_scale: float  # ||delta||_F / ||W||_F
    steps: int  # the run's planned steps
    seed: int
    hidden: int = 32
    init_range: float = 0.2  # a wide init makes the base confident, so its samples carry structure
    vocab_size: int = 512
    seq_len: int = 32  # tokens after the leading BOS
    train_rows: int = 1024
    heldout_rows: int = 256
    temperature: float = 0.7
    lora_r: int = 8
    learning_rate: float = 3e-3
    batch: int = 32

    @property
    def k(self) -> int:
        return len(self.planted)

    @property
    def name(self) -> str:
        return f"{self.family}-L{self.layers}-s{self.steps}-seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["planted"] = list(self.planted)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PlantedTask":
        return cls(**{**data, "planted": tuple(data["planted"])})


def random_task(seed: int, steps: tuple[int, int] = (150, 1000), families: tuple[str, ...] = FAMILIES) -> PlantedTask:
    """A task drawn at random: family, depth (2-5 blocks), 2-4 planted modules of
    any kinds, delta rank 1-8 and size 0.5-1.5 of the weight, planned steps
    log-uniform in ``steps`` (rounded to 10)."""
    rng = random.Random(seed)
    family = rng.choice(families)
    layers = rng.randint(2, 5)
    count = rng.randint(2, 4)
    planted = tuple(sorted(rng.sample(candidate_modules(family, layers), count), key=candidate_modules(family, layers).index))
    low, high = steps
    run = int(round(math.exp(rng.uniform(math.log(low), math.log(high))) / 10) * 10)
    return PlantedTask(
        family=family,
        layers=layers,
        planted=planted,
        delta_rank=rng.choice((1, 2, 4, 8)),
        delta_scale=round(rng.uniform(0.5, 1.5), 3),
        steps=min(max(run, low), high),
        seed=seed,
    )


@dataclass
class TaskFiles:
    """What ``build_task`` writes under its root."""

    root: Path
    model: Path  # the base model with its tokenizer: what the search and LoRA train on
    teacher: Path
    train: Path  # pre-tokenized rows (input_ids, attention_mask, labels), for axolotl
    tensors: Path  # train and held-out token ids as tensors, for ``train_lora``
    meta: dict[str, Any] = field(default_factory=dict)


def _order(task: PlantedTask, modules) -> list[str]:
    """Model order; modules outside the blocks (an output head a search
    ranked, as GPT-NeoX's lm_head under lora_target_linear) last."""
    order = candidate_modules(task.family, task.layers)
    return sorted(set(modules), key=lambda n: (order.index(n) if n in order else len(order), n))


@torch.no_grad()
def plant(base: torch.nn.Module, task: PlantedTask) -> torch.nn.Module:
    """Add a random rank-``delta_rank`` delta of relative size ``delta_scale`` to
    each planted module's weight (in place); returns the model."""
    generator = torch.Generator().manual_seed(10_000 + task.seed)
    for name in task.planted:
        weight = base.get_submodule(name).weight
        delta = torch.randn(weight.shape[0], task.delta_rank, generator=generator) @ torch.randn(task.delta_rank, weight.shape[1], generator=generator)
        weight += delta * (task.delta_scale * weight.norm() / delta.norm())
    return base


def build_task(task: PlantedTask, root: str | Path) -> TaskFiles:
    """Base model, teacher, and teacher samples (train and held-out) under ``root``.
    Built once; a second call reads what is there."""

    root = Path(root)
    files = TaskFiles(
        root=root,
        model=root / "base",
        teacher=root / "teacher",
        train=root / "train.jsonl",
        tensors=root / "tokens.pt",
    )
    if files.tensors.exists() and (files.model / "config.json").exists() and files.train.exists():
        return files
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(make_alpaca_rows(256, seed=task.seed), files.model, vocab_size=task.vocab_size)
    base = build_model(
        files.model,
        architecture=task.family,
        layers=task.layers,
        hidden=task.hidden,
        vocab_size=len(tokenizer),
        seed=task.seed,
        initializer_range=task.init_range,
    )
    teacher = plant(base, task).eval()
    teacher.save_pretrained(str(files.teacher))
    torch.manual_seed(task.seed)
    start = torch.full((task.train_rows + task.heldout_rows, 1), teacher.config.bos_token_id)
    with torch.no_grad():
        samples = teacher.generate(
            start,
            do_sample=True,
            temperature=task.temperature,
            top_k=0,
            max_new_tokens=task.seq_len,
            min_new_tokens=task.seq_len,
            pad_token_id=teacher.config.pad_token_id,
        )
    train, heldout = samples[: task.train_rows], samples[task.train_rows :]
    # Pre-tokenized rows: axolotl uses them as they are (no text round trip).
    write_jsonl(files.train, [{"input_ids": s.tolist(), "attention_mask": [1] * len(s), "labels": s.tolist()} for s in train])
    tmp = files.tensors.with_name(f".{files.tensors.name}.tmp")
    torch.save({"train": train.clone(), "heldout": heldout.clone()}, tmp)
    tmp.replace(files.tensors)
    return files


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, tokens: torch.Tensor, batch: int = 64) -> float:
    """Mean next-token cross-entropy (nats/token) over ``tokens``."""
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch):
        chunk = tokens[i : i + batch]
        logits = model(input_ids=chunk).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += chunk[:, 1:].numel()
    return total / count


@torch.no_grad()
def _log_probs(model: torch.nn.Module, tokens: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([torch.log_softmax(model(input_ids=tokens[i : i + batch]).logits[:, :-1].float(), -1) for i in range(0, len(tokens), batch)])


@torch.no_grad()
def revert_kl(files: TaskFiles, task: PlantedTask) -> dict[str, Any]:
    """KL(teacher || teacher with deltas reverted), nats/token on the held-out
    samples: for each planted delta alone, and for all of them (= the base)."""
    heldout = torch.load(files.tensors)["heldout"]
    teacher, base = _load(files.teacher), _load(files.model)
    reference = _log_probs(teacher, heldout)

    def kl(model) -> float:
        other = _log_probs(model, heldout)
        return float((reference.exp() * (reference - other)).sum(-1).mean())

    alone = {}
    for name in task.planted:
        weight = teacher.get_submodule(name).weight
        planted = weight.detach().clone()
        weight.copy_(base.get_submodule(name).weight)
        alone[name] = round(kl(teacher), 5)
        weight.copy_(planted)
    return {
        "kl_revert_alone": alone,
        "kl_revert_all": round(kl(base), 5),
        "teacher_loss": round(heldout_loss(teacher, heldout), 5),
        "base_loss": round(heldout_loss(base, heldout), 5),
    }


def train_lora(files: TaskFiles, task: PlantedTask, modules, steps: int | None = None) -> float:
    """Held-out loss of LoRA on ``modules`` only, trained from the base for the
    task's planned steps (AdamW, constant learning rate, the task's rank, batch
    and seed; alpha = 2 r, no dropout). The same modules give the same loss."""
    from peft import LoraConfig, get_peft_model

    names = _order(task, modules)
    if not names:
        raise ValueError("train_lora needs at least one module")
    data = torch.load(files.tensors)
    train, heldout = data["train"], data["heldout"]
    torch.manual_seed(task.seed)
    model = get_peft_model(
        _load(files.model),
        LoraConfig(r=task.lora_r, lora_alpha=2 * task.lora_r, lora_dropout=0.0, target_modules=names),
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=task.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(task.seed)
    order: list[int] = []
    for _ in range(steps if steps is not None else task.steps):
        if len(order) < task.batch:
            order += torch.randperm(len(train), generator=generator).tolist()
        batch = train[order[: task.batch]]
        del order[: task.batch]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return heldout_loss(model, heldout)


def measure_truth(files: TaskFiles, task: PlantedTask) -> dict[str, Any]:
    """The task's measured truth: the planted deltas' weights in the teacher and
    the held-out loss of LoRA on the planted set at the planned steps."""
    truth = revert_kl(files, task)
    truth["planted_loss"] = round(train_lora(files, task, task.planted), 5)
    return truth


def search_config(task: PlantedTask, files: TaskFiles, out: Path, ranking: Path, **overrides: Any) -> dict[str, Any]:
    """An axolotl config that searches on the task as a user would: LoRA on
    every linear module of the blocks, the task's rank, learning rate, batch
    and planned steps, constant schedule, every ``ila_`` key at its default
    unless ``overrides`` says otherwise."""
    cfg: dict[str, Any] = {
        "base_model": str(files.model),
        "datasets": [{"path": str(files.train), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(out / "prepared"),
        "output_dir": str(out / "run"),
        "plugins": ["axolotl_ila.ILAPlugin"],
        **CPU_TRAINING,
        "adapter": "lora",
        "lora_r": task.lora_r,
        "lora_alpha": 2 * task.lora_r,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "sequence_len": task.seq_len + 8,
        "val_set_size": 0,
        "dataset_num_proc": 1,  # spawning tokenizer workers costs more than the work here
        "micro_batch_size": task.batch,
        "learning_rate": task.learning_rate,
        "lr_scheduler": "constant",
        "max_steps": task.steps,
        "logging_steps": 1,
        "seed": task.seed,
        "ila_ranking": str(ranking),
    }
    cfg.update(overrides)
    return cfg


def write_config(cfg: dict[str, Any], path: Path) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def keep_k(names: list[str], k: int) -> list[str]:
    return list(names[:k])


def recall(chosen, planted) -> float:
    return len(set(chosen) & set(planted)) / len(planted)


def save_json(path: Path, data: Any) -> None:
    from axolotl_ila.atomic import write_json_atomic

    write_json_atomic(path, data)


def load_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def base_gradient_scores(files: TaskFiles, task: PlantedTask, batches: int = 4) -> dict[str, float]:
    """A signal that needs no warm-up: for each candidate module, the gradient
    of the training loss with respect to its full weight at the base,
    accumulated over ``batches`` batches, and scored by the energy of its top
    ``lora_r`` singular values (how much a rank-r step on that module alone
    would lower the loss, to first order)."""
    data = torch.load(files.tensors)["train"]
    model = _load(files.model)
    names = candidate_modules(task.family, task.layers)
    for param in model.parameters():
        param.requires_grad_(False)
    weights = {name: model.get_submodule(name).weight for name in names}
    for weight in weights.values():
        weight.requires_grad_(True)
    generator = torch.Generator().manual_seed(task.seed)
    order = torch.randperm(len(data), generator=generator)
    for i in range(batches):
        batch = data[order[i * task.batch : (i + 1) * task.batch]]
        (model(input_ids=batch, labels=batch).loss / batches).backward()
    scores = {}
    for name, weight in weights.items():
        singular = torch.linalg.svdvals(weight.grad.float())
        scores[name] = float(singular[: task.lora_r].pow(2).sum().sqrt())
    return scores
