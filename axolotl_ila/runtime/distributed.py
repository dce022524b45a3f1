"""Multi-process agreement: one process writes, every process reads the same file.

Under ``accelerate launch`` / ``torchrun`` every rank runs the plugin. Each may
compute a ranking, but only the main process writes it; the others wait for the
outcome (success or the writer's error) and then load the very same file, so all
ranks train the same selection even if their own scores differed in the last bit.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    """True in a multi-process run; joins the process group if the launcher
    (torchrun / accelerate) started several processes and nobody has yet."""
    if not dist.is_available():
        return False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState()  # initializes the default process group from the launcher's env
    return dist.is_initialized()


def rank() -> int:
    if is_distributed():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def on_main(work: Callable[[], T]) -> T:
    """Run ``work`` on the main process only; every process gets its result.

    An error on the main process is re-raised on every rank (instead of leaving
    the others waiting at a barrier forever).
    """
    error: str | None = None
    result = None
    if is_main_process():
        try:
            result = work()
        except Exception as exc:  # re-raised below, on every rank
            error = f"{type(exc).__name__}: {exc}"
            if not is_distributed():
                raise
    if is_distributed():
        box = [error, result]
        dist.broadcast_object_list(box, src=0)
        error, result = box
    if error is not None:
        raise RuntimeError(f"ILA: the main process failed to write: {error}")
    return result


def all_reduce_mean_(tensor) -> None:
    """Average a tensor across processes in place (no-op on one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())


def is_sharded(tensor: Any) -> bool:
    """A DTensor: FSDP2 keeps a shard of it on each rank."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def all_reduce_grad_mean_(grad) -> None:
    """Average a gradient across processes, unless FSDP2 already has: its
    backward leaves each rank the average of its shard (a DTensor)."""
    if not is_sharded(grad):
        all_reduce_mean_(grad)


def same_on_all_ranks(value: str) -> bool:
    """True when every rank passes the same string (e.g. a ranking digest)."""
    if not is_distributed():
        return True
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return all(v == value for v in gathered)


def is_zero3_partitioned(param) -> bool:
    """A parameter DeepSpeed ZeRO-3 partitioned: outside a forward each rank holds
    only its partition (``param.ds_tensor``), and ``param`` itself is empty."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


@contextmanager
def gathered(params: Iterable) -> Iterator[None]:
    """The whole of each parameter for the duration, read-only. Under ZeRO-3 this
    is a collective (``deepspeed.zero.GatheredParameters``): every rank must
    enter it for the same parameters in the same order. Otherwise it does nothing."""
    partitioned = [p for p in params if is_zero3_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield
