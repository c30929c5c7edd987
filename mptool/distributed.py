"""Mask learning and recovery over several processes on torch.distributed (torchrun; gloo on
CPU, nccl on GPU), with the weights replicated (``ddp``) or sharded (``fsdp``).

The global batch is split across ranks. The masks are plain tensors updated by proximal steps, so
their gradients are averaged with one explicit ``all_reduce`` and every rank takes the identical
mask update. LoRA gradients are averaged the same way under ``ddp`` (every rank holds the whole
model); under ``fsdp`` each decoder layer and the root are wrapped with torch's FSDP2
``fully_shard``, so weights, LoRA, gradients and optimiser states are sharded over ranks and the
reduce-scatter of FSDP averages the LoRA gradients. With equal shards either gives the one-process
gradient of the same global batch, up to float reduction order.

Checkpoints hold full (gathered) tensors, keyed by parameter name, so a run resumes under any
number of processes and either sharding. Only rank 0 writes checkpoints and outputs.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Iterable

import torch
import torch.distributed as dist

from mptool.errors import MptoolError


def world_size_from_env() -> int:
    """The number of processes torchrun launched (1 without it), before the group is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device_choice: str = "auto") -> None:
    """Join the process group torchrun describes in the environment (no-op for one process):
    nccl when this run uses GPUs, gloo on the CPU."""
    if world_size_from_env() > 1 and not dist.is_initialized():
        backend = "nccl" if device(device_choice).type == "cuda" else "gloo"
        if backend == "nccl":  # one GPU per process: nccl and FSDP use the current device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        # rank 0 evaluates and writes alone while the others wait at a barrier: allow for it
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))


SHARDINGS = ("ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")


def device(choice: str = "auto") -> torch.device:
    """The compute device of this process: ``cuda:LOCAL_RANK`` when CUDA is there (and asked), else CPU."""
    if choice not in DEVICES:
        raise MptoolError(f"device {choice!r} is not one of {', '.join(DEVICES)}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise MptoolError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


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
    flat = torch.cat([g.reshape(-1).to(_comm_device()) for g in grads])
    dist.all_reduce(flat)
    flat /= n
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g).to(g.device))
        offset += g.numel()


def clip_grads(params: Iterable[torch.Tensor], max_norm: float | None) -> float:
    """The global L2 norm of ``params``' gradients, which are scaled down to ``max_norm`` when it
    is exceeded (None: measured only). Called after the gradients are averaged over ranks, so every
    rank clips alike; under FSDP the sharded gradients' norm is the whole gradient's."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm is not None else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def sum_(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks (a new CPU tensor)."""
    if world_size() == 1:
        return t.clone()
    buf = t.to(_comm_device()).clone()
    dist.all_reduce(buf)
    return buf.cpu()


def merge_stats_(stats: Any, width: int, dev: torch.device) -> None:
    """Sum one projection's input statistics (:class:`mptool.hooks.InputStats`) over ranks in
    place: counts, sums, sums of squares and Gram matrices add, per-column maxima take the
    maximum; a rank that saw no token contributes zeros of ``width`` columns. A Gram with an
    owner was summed onto it batch by batch already and stays there."""
    zeros = torch.zeros(width, dtype=torch.float64, device=dev)
    stats.n = int(sum_(torch.tensor([float(stats.n)], dtype=torch.float64))[0])
    for name in ("sum", "sumsq", "amax"):
        t = getattr(stats, name)
        t = zeros.clone() if t is None else t
        buf = t.to(_comm_device())
        dist.all_reduce(buf, op=dist.ReduceOp.MAX if name == "amax" else dist.ReduceOp.SUM)
        setattr(stats, name, buf.to(dev))
    if stats.track_gram and stats.gram_owner is None:  # summed on the host, like the hooks keep it
        g = stats.gram if stats.gram is not None else torch.zeros(width, width, dtype=torch.float64)
        stats.gram = sum_(g)


def mean(value: float) -> float:
    """Mean of a scalar over ranks (for logging)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t) / world_size()


def union(mask: torch.Tensor) -> torch.Tensor:
    """Element-wise OR of a bool tensor over ranks, so every rank holds the same set (on the CPU)."""
    if world_size() == 1:
        return mask
    t = mask.to(device=_comm_device(), dtype=torch.uint8)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.bool().cpu()


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s values of ``t`` on every rank, in place (through the collective device)."""
    if world_size() == 1:
        return t
    buf = t.to(_comm_device()).contiguous()
    dist.broadcast(buf, src=src)
    if buf is not t:
        t.copy_(buf)
    return t


def reduce_to(t: torch.Tensor, dst: int) -> torch.Tensor | None:
    """``t`` summed over ranks, on rank ``dst`` only (None elsewhere; every rank calls). The
    result is on the collective device; ``t`` is reduced in place where it is already there (pass
    a temporary: a Gram at 70B is 6.6 GB, one copy on the GPU is enough)."""
    if world_size() == 1:
        return t
    buf = t.to(_comm_device())
    dist.reduce(buf, dst=dst)
    return buf if rank() == dst else None


def owner(layer: int) -> int:
    """The rank that keeps a layer's share of per-layer state held by one process only (the
    Gram matrices of compensation under FSDP): layers dealt round-robin."""
    return layer % world_size()


def every(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank: one decision all ranks act on alike."""
    return not bool(union(torch.tensor([not flag]))[0])


def processes_per_host() -> int:
    """Processes of this run that share this host's memory (torchrun's ``LOCAL_WORLD_SIZE``;
    without it, all of them)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors must live: the GPU for nccl, the CPU for gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sharded(sharding: str) -> bool:
    """Whether models are wrapped with FSDP in this run (``fsdp`` and more than one process)."""
    if sharding not in SHARDINGS:
        raise MptoolError(f"sharding {sharding!r} is not one of {', '.join(SHARDINGS)}")
    return sharding == "fsdp" and world_size() > 1


def on_meta(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a skeleton on the meta device (shapes, no weights): what the ranks
    other than 0 hold when only rank 0 loads the weights (:func:`fsdp_wrap` fills them in)."""
    return any(p.is_meta for p in model.parameters())


def fsdp_wrap(model: torch.nn.Module, layers: Iterable[torch.nn.Module]) -> None:
    """Shard ``model`` in place with FSDP2: each decoder layer is one unit, the rest is the root's.

    Hooks registered on submodules before (the masks) keep working: FSDP2 changes no module
    structure, it only gathers each layer's parameters around its forward and backward.

    Where some rank holds only a meta-device skeleton (the weights were loaded on rank 0
    alone), the skeletons are sharded as they are, given storage, and every rank takes its
    shard of rank 0's tensors, one tensor at a time: no rank but 0 ever holds the whole model.
    Buffers that are not in the state dict (rotary frequencies) and the CPU RNG state are
    rank 0's too, so every rank goes on exactly as if it had loaded the weights itself.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    empty = on_meta(model)
    from_rank0 = not every(not empty)
    if from_rank0 and is_main() and empty:
        raise MptoolError("rank 0 must hold the weights that the other ranks take their shards of")
    full = model.state_dict() if from_rank0 and is_main() else {}
    mesh = init_device_mesh(_comm_device().type, (world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if from_rank0:
        _fill_from_rank0(model, full, empty)


def _fill_from_rank0(model: torch.nn.Module, full: dict[str, torch.Tensor], empty: bool) -> None:
    """Every rank's shards of rank 0's ``full`` state dict (empty elsewhere), its buffers and RNG."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if empty:
        model.to_empty(device=_comm_device())
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    full.clear()  # rank 0's whole tensors go as soon as the shards are taken
    with torch.no_grad():
        for _, buf in sorted(model.named_buffers()):
            broadcast_(buf)
    torch.set_rng_state(broadcast_(torch.get_rng_state()))


def from_rank0(tensors: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Rank 0's ``tensors`` on every rank (the others pass None: shapes and dtypes come with them).

    One small object broadcast for the shapes, then one tensor broadcast each; on the CPU.
    """
    if world_size() == 1:
        return list(tensors or [])
    spec = [[(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in tensors] if is_main() else None]
    dist.broadcast_object_list(spec, src=0, device=_comm_device())
    out = list(tensors) if is_main() else [torch.empty(shape, dtype=getattr(torch, dtype)) for shape, dtype in spec[0]]
    for t in out:
        broadcast_(t)
    return out


def object_from_rank0(obj: Any) -> Any:
    """Rank 0's picklable ``obj`` (trusted: made by this run's rank 0) on every rank."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def to_owners(tensors: list[torch.Tensor | None] | None) -> list[torch.Tensor | None]:
    """Rank 0's per-layer ``tensors`` dealt out: entry ``i`` on rank :func:`owner` ``(i)`` only,
    None on every other rank (the others pass None). Rank 0's entries for other ranks are dropped
    from its list as they are sent, so no process holds more than its share once this returns
    (the Gram matrices of a one-shot calibration: 6.6 GB per layer at 70B). Point-to-point, one
    tensor in flight at a time; results on the CPU."""
    if world_size() == 1:
        return list(tensors or [])
    spec = [[None if t is None else (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in tensors]
            if is_main() else None]
    dist.broadcast_object_list(spec, src=0, device=_comm_device())
    out: list[torch.Tensor | None] = []
    for i, s in enumerate(spec[0]):
        dst = owner(i)
        if s is None or dst == 0:
            out.append(tensors[i] if is_main() and dst == 0 else None)
        elif is_main():
            dist.send(tensors[i].to(_comm_device()).contiguous(), dst=dst)
            tensors[i] = None
            out.append(None)
        elif rank() == dst:
            buf = torch.empty(s[0], dtype=getattr(torch, s[1]), device=_comm_device())
            dist.recv(buf, src=0)
            out.append(buf.cpu())
        else:
            out.append(None)
    return out


def gather_floats(value: float) -> list[float]:
    """``value`` of every rank, in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    t = torch.zeros(world_size(), dtype=torch.float64, device=_comm_device())
    t[rank()] = value
    dist.all_reduce(t)
    return t.cpu().tolist()


def place(model: torch.nn.Module, layers: Iterable[torch.nn.Module], is_sharded: bool,
          dev: torch.device) -> None:
    """Shard ``model`` over the ranks (FSDP, onto each rank's device) or move it whole to ``dev``."""
    if is_sharded:
        fsdp_wrap(model, layers)
    else:
        model.to(dev)


def unsharded_lora(sharded_model: torch.nn.Module, plain: torch.nn.Module, lora_config: Any) -> Any:
    """``plain`` (whole base weights) with the LoRA weights gathered from ``sharded_model``.

    A collective under FSDP: every rank calls it and gets the same peft model, ready to merge
    (a rank that holds a meta-device skeleton for ``plain`` gets the skeleton with LoRA). The
    throwaway LoRA initialisation does not move the RNG streams on.
    """
    from peft import get_peft_model

    lora = full_trainable(sharded_model)
    with torch.random.fork_rng(devices=[]):
        model = get_peft_model(plain, lora_config)
    if not on_meta(plain):  # a skeleton (this rank loaded no weights) gets the structure only
        load_full_state(model, None, lora, None)
    return model


def full_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter as a full CPU tensor, by name (a collective under FSDP)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
            out[name] = t.detach().cpu().clone()
    return out


def full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimiser state keyed by parameter name, with full tensors (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))


def load_full_state(model: torch.nn.Module, opt: torch.optim.Optimizer | None,
                    params: dict[str, torch.Tensor], opt_state: dict | None) -> None:
    """Inverse of :func:`full_trainable` / :func:`full_optimizer_state` (every rank passes the full state)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable - params.keys())
    if missing:  # strict=False below would keep their fresh initialisation without a word
        raise MptoolError(f"checkpoint lacks {len(missing)} of this model's {len(trainable)} trainable tensors "
                          f"(e.g. {missing[0]}); was it written for another model or recipe, or damaged?")
    result = set_model_state_dict(model, params, options=StateDictOptions(full_state_dict=True, strict=False))
    if result.unexpected_keys:  # strict=False is for the frozen base weights, not for unknown tensors
        raise MptoolError(f"checkpoint holds {len(result.unexpected_keys)} tensors this model does not have "
                          f"(e.g. {sorted(result.unexpected_keys)[0]}); was it written for another model "
                          "or mptool version?")
    if opt is not None and opt_state is not None:
        set_optimizer_state_dict(model, opt, opt_state, options=StateDictOptions(full_state_dict=True))
