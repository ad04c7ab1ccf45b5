"""Several processes under `torchrun` (or `accelerate launch`): one per GPU, read from RANK / LOCAL_RANK /
WORLD_SIZE. Without them (or with WORLD_SIZE 1) every function here is a no-op and training is one process.

LoRA gradients are averaged by one flat all-reduce after backward rather than DDP: the ~27M LoRA parameters fit
one buffer, a rank with no clip in the last, short batch of an epoch still joins the reduction (DDP would wait for
its forward), and the model stays a plain module (checkpoints, validation and the engine see the same names).

Rank 0 alone writes. Work that may fail (the config and data checks on every rank; rank 0's checkpoint, metrics
and validation while the others wait) runs through `together`: a failure on any rank makes every rank raise,
none waits forever, and one rank reports it.
"""
from __future__ import annotations

import gc
import os
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

# Rank 0's validation of the 3B (generation + codec) may keep the others waiting for minutes
TIMEOUT = timedelta(minutes=60)


class StoppedElsewhere(RuntimeError):
    """Another rank failed and reported the error; this one stops quietly with a non-zero exit."""


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init() -> int:
    """Join the process group when launched with WORLD_SIZE > 1: gloo for CPU tensors (the error flags, CPU
    training), NCCL for CUDA ones, each rank on the GPU LOCAL_RANK. Returns the world size."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or dist.is_initialized():
        return world()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    return world()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


_stopping_together = False  # set when every rank raised at the same point (together, stop)


def close():
    """Leave the process group. After an error every rank raised at once, the ranks first wait for each other,
    so the one that reports it has printed before a launcher ends the rest."""
    if dist.is_initialized():
        if _stopping_together:
            dist.all_reduce(torch.zeros(1))
        # FSDP's modules (reference cycles) keep the process group alive past destroy_process_group; freed at
        # interpreter exit instead, gloo's worker threads can abort the process after a run that succeeded
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In place, on every rank; returns t."""
    if world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def average_gradients(params: list[torch.nn.Parameter]):
    """Every rank's gradients replaced by their mean over ranks: one flat buffer, one all-reduce. A parameter
    without a gradient (a rank that had no clip) counts as zeros."""
    if world() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world()
    offset = 0
    for p in params:
        n = p.numel()
        mean = flat[offset:offset + n].view_as(p)
        if p.grad is None:
            p.grad = mean  # a view of the one buffer: no second copy
        else:
            p.grad.copy_(mean)  # in place: a captured step (hmtiny/captured_step.py) accumulates into p.grad
        offset += n


def my_share(indices: list[int]) -> list[int]:
    """This rank's contiguous part of a global batch (parts differ in size by one at most; a short last batch of
    an epoch may leave a rank none). One process: the whole batch."""
    n, w, r = len(indices), world(), rank()
    return indices[r * n // w:(r + 1) * n // w]


def rank0_value(value: int) -> int:
    """Rank 0's integer on every rank (a seed drawn at random must be one seed)."""
    if world() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return int(t)


def broadcast_parameters(params: list[torch.nn.Parameter]):
    """Rank 0's values on every rank (the LoRA's random start must be one start)."""
    if world() > 1:
        for p in params:
            dist.broadcast(p.data, src=0)


def stop(error: Exception):
    """Raise an error that every rank found alike (a NaN loss after the all-reduce): rank 0 reports it."""
    global _stopping_together
    _stopping_together = world() > 1
    raise error if is_main() else StoppedElsewhere(str(error))


def together(work: Callable[[], object], what: str, rank0_only: bool = False):
    """Run `work` on every rank (or on rank 0 alone, the others waiting) and return its result; if it raised
    anywhere, raise everywhere: the lowest failing rank re-raises its own error (reported once), the others raise
    StoppedElsewhere. The flag exchange is also the barrier."""
    error, result = None, None
    if not rank0_only or is_main():
        try:
            result = work()
        except BaseException as e:  # noqa: BLE001 -- re-raised below, after the other ranks know
            error = e
    if world() == 1:
        if error is not None:
            raise error
        return result
    failed = torch.zeros(world())
    failed[rank()] = float(error is not None)
    dist.all_reduce(failed, op=dist.ReduceOp.SUM)
    failing = failed.nonzero().flatten().tolist()
    if not failing:
        return result
    global _stopping_together
    _stopping_together = True
    if failing[0] == rank():
        raise error
    raise StoppedElsewhere(f"rank {failing[0]} failed while {what}")
