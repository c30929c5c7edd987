"""Data-parallel mask learning and recovery on torch.distributed (torchrun; gloo on CPU, nccl on GPU).

Every rank holds the model, the masks and the LoRA adapters; the global batch is split across
ranks, and after each backward pass the gradients of LoRA and of the masks are averaged with one
``all_reduce`` each, so every rank takes the identical update (DDP semantics, kept explicit because
the masks are plain tensors updated by proximal steps). With equal shards the averaged gradient
equals the one-process gradient of the same global batch, up to float reduction order.
Only rank 0 writes checkpoints and outputs.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist

from mptool.errors import MptoolError


def init_from_env() -> None:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the global batch."""
    n = world_size()
    if n == 1:
        return batch
    if len(batch) % n:
        raise MptoolError(f"batch size {len(batch)} is not divisible by {n} processes; "
                          f"use a batch size that is a multiple of --nproc-per-node")
    per = len(batch) // n
    return batch[rank() * per:(rank() + 1) * per]


def average_grads(tensors: Iterable[torch.Tensor]) -> None:
    """Average ``.grad`` over ranks, in place (one flat all_reduce)."""
    n = world_size()
    if n == 1:
        return
    grads = [t.grad for t in tensors if t.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= n
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def mean(value: float) -> float:
    """Mean of a scalar over ranks (for logging)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
