"""Memory model: per-device memory of mask learning and recovery for a model config.

Counted from the shapes (no weights loaded), per device, for ``gpus`` data-parallel (DDP:
weights replicated) or FSDP (weights, LoRA and optimiser states sharded) workers:

* weights: total parameters x bytes of the training dtype (bf16 on GPU, fp32 on CPU);
* LoRA: r x (in + out) per adapted projection, fp32 weights + grads + 2 Adam moments (16 B);
* masks: one per KV group, query head and FFN channel per layer (weights, grads, multipliers,
  importance: 16 B each);
* activations saved for backward, per token per layer, in the compute dtype: the projection
  inputs and outputs of attention and FFN, the masked copies, the rotary q/k copies, the
  GQA-expanded k/v and the norms' internals (``8*hidden + 5*H*hd + 4*G*hd + 5*I`` values),
  times tokens per device = ``batch/gpus x seq_len``; with activation checkpointing
  (``--grad-checkpointing``) only each layer's input hidden state is kept, plus one layer's
  tensors and their gradients while it is recomputed in the backward pass;
* logits: student and teacher logits, both log-softmaxes and the KD terms, and the gradient:
  about 8 fp32 copies of ``tokens x vocab``; with the KD loss in checkpointed chunks
  (``kd_chunk``) 3 full copies (both logits, the gradient) and 5 of ``chunk x vocab``;
* runtime: a fixed allowance for the framework (CUDA context and allocator slack on GPU, about
  0.5 GiB; thread pools and oneDNN buffers on CPU, about 0.1 GiB).
* FSDP gathering: a sharded process still holds whole parameters while they compute: the root
  unit (embedding and LM head) through the step, and a decoder layer plus the next one prefetched;
* compensation (``--compensate``, the default): mask learning holds, per layer, the delta of
  the kept columns of o_proj and down_proj (``hidden x (kept heads x head_dim + kept FFN)`` in
  the weight dtype; the dense shape without a target, an upper bound), replicated on every
  device; the input Gram matrices it is computed from stay in host memory
  (``layers x ((heads x head_dim)^2 + intermediate^2) x 8`` bytes per process, reported as
  ``host_gram_bytes``, not in the per-device sum; with several processes (DDP or FSDP) and
  MaskPrune's learned selection, the default, each keeps those of its share of the layers,
  ``ceil(layers / processes)`` of them; one-shot methods and selections keep all of them in every
  process);
* host memory (``host_weights``, not in the per-device sum): the process that loads the weights
  holds the whole dense model in the weight dtype; at MaskPrune's end it reloads them to merge
  LoRA into and slices them one tensor at a time into the pruned model (``materialize`` with
  ``consume``: the dense model plus one tensor), while a one-shot method keeps the dense model
  beside the sliced copy (the recovery teacher); under FSDP only rank 0 loads them and the
  others take their shards one tensor at a time (about the largest tensor in transit); under DDP
  every process loads them;
* teacher: mask learning reuses the student's weights with adapters disabled (no copy); recovery
  with a fresh adapter (``recovery.adapter: fresh``) keeps the dense model too
  (``teacher="memory"``) unless its logits are cached. The default recovery after MaskPrune
  (``adapter: continue``) trains on in mask learning's model, masks frozen: its memory is the
  "mask" row's, so the "recovery" rows are for fresh adapters (and one-shot methods).

The estimate is checked against measured peak memory on a small model in the tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from mptool.errors import MptoolError
from mptool.shapes import Dims, Target, gram_bytes, total_params

GIB = 1024 ** 3


@dataclass(frozen=True)
class PlanInput:
    batch_size: int = 4
    seq_len: int = 256
    lora_r: int = 8
    dtype_bytes: int = 2
    gpus: int = 1
    sharding: str = "fsdp"  # "fsdp" or "ddp"
    recovery_teacher: str = "memory"
    runtime_bytes: float = 0.5 * GIB
    checkpointing: bool = False
    kd_chunk: int | None = 2048
    compensate: bool = True


def lora_params(d: Dims, r: int, t: Target | None = None) -> int:
    t = t or d.dense_target()
    h, hd = d.hidden_size, d.head_dim
    q, kv, o = t.heads * hd, t.kv_heads * hd, t.heads * hd
    per_layer = r * ((h + q) + 2 * (h + kv) + (o + h) + 2 * (h + t.ffn) + (t.ffn + h))
    return d.num_layers * per_layer


def activation_values_per_token(d: Dims, t: Target | None = None, checkpointing: bool = False) -> int:
    t = t or d.dense_target()
    per_layer = 8 * d.hidden_size + 5 * t.heads * d.head_dim + 4 * t.kv_heads * d.head_dim + 5 * t.ffn
    if checkpointing:  # the layer inputs, and one layer's tensors and gradients during its recompute
        return d.num_layers * d.hidden_size + 2 * per_layer
    return d.num_layers * per_layer


def estimate(d: Dims, p: PlanInput, phase: str = "mask", target: Target | None = None) -> dict[str, Any]:
    """Per-device bytes of each component for ``phase`` "mask" (mask learning) or "recovery"."""
    shard = p.gpus if p.sharding == "fsdp" else 1
    student = target if phase == "recovery" else None
    weights = total_params(d, student) * p.dtype_bytes / shard
    gathered = 0.0
    if shard > 1:  # FSDP: the root unit whole, and two decoder layers whole at a time
        t = student or d.dense_target()
        root = d.vocab_size * d.hidden_size * (1 if d.tied else 2)
        layer = (total_params(d, t) - root) / d.num_layers
        gathered = (root + 2 * layer) * p.dtype_bytes * (1 - 1 / shard)
    lora = 16 * lora_params(d, p.lora_r, student) / shard
    masks = 16 * d.num_layers * (d.num_kv_heads + d.num_heads + d.intermediate_size) if phase == "mask" else 0
    tokens = p.batch_size * p.seq_len / p.gpus
    acts = tokens * activation_values_per_token(d, student, p.checkpointing) * p.dtype_bytes
    chunk = tokens if p.kd_chunk is None else min(tokens, p.kd_chunk)
    logits = (3 * tokens + 5 * chunk) * d.vocab_size * 4
    t = target or d.dense_target()
    comp = (d.num_layers * d.hidden_size * (t.heads * d.head_dim + t.ffn) * p.dtype_bytes
            if phase == "mask" and p.compensate else 0.0)
    teacher = 0.0
    if phase == "recovery" and p.recovery_teacher == "memory":
        teacher = total_params(d) * p.dtype_bytes / shard
    parts = {"weights": weights, "fsdp_gathered": gathered, "lora_and_optimizer": lora, "masks": masks, "activations": acts,
             "logits": logits, "teacher": teacher, "compensation": comp, "runtime": p.runtime_bytes}
    return {"phase": phase, "per_device_bytes": sum(parts.values()), "parts": parts, "input": asdict(p),
            "host_gram_bytes": gram_bytes(d, p.gpus) if p.compensate else 0}


def host_weights(d: Dims, p: PlanInput, target: Target | None = None) -> dict[str, float]:
    """Host bytes of weights per process (see the module notes): rank 0's under MaskPrune (the
    dense model and one tensor being sliced) and under a one-shot method (the dense model and the
    sliced copy), and every other rank's, under ``p.sharding``."""
    dense = total_params(d) * p.dtype_bytes
    largest = max(d.vocab_size * d.hidden_size, d.intermediate_size * d.hidden_size) * p.dtype_bytes
    one_shot = dense + total_params(d, target or d.dense_target()) * p.dtype_bytes
    return {"rank0": dense + largest, "rank0_one_shot": one_shot,
            "other": largest if p.sharding == "fsdp" else dense + largest}


def plan_table(d: Dims, gpu_counts: list[int], gpu_mem_gib: float, base: PlanInput,
               target: Target | None = None) -> list[dict[str, Any]]:
    rows = []
    for n in gpu_counts:
        for sharding in ("ddp", "fsdp"):
            p = PlanInput(**{**asdict(base), "gpus": n, "sharding": sharding})
            for phase in ("mask", "recovery"):
                e = estimate(d, p, phase, target or d.dense_target())
                gib = e["per_device_bytes"] / GIB
                rows.append({"gpus": n, "sharding": sharding, "phase": phase, "per_gpu_gib": round(gib, 2),
                             "per_gpu_bytes": int(e["per_device_bytes"]),
                             "fits": gib <= gpu_mem_gib * 0.9,
                             "host_gram_gib": round(e["host_gram_bytes"] / GIB, 2),
                             "parts_gib": {k: round(v / GIB, 2) for k, v in e["parts"].items()}})
    return rows


def print_plan(model: str | None, gpus: list[int], gpu_mem_gib: float, base: PlanInput,
               as_json: bool = False, ratio: float | None = None, tp: tuple[int, ...] = (1,),
               ffn_multiple: int = 64, target: tuple[int | None, int | None, int | None] | None = None,
               seq_len_flag: str | None = "--seq-len") -> list[dict[str, Any]]:
    """`mptool plan`: per-GPU memory of mask learning and recovery for each GPU count.

    Recovery trains the pruned student: an explicit ``target`` (kv_heads, heads_per_group, ffn;
    None keeps the dense size) as given; with ``ratio`` the balanced legal target at that ratio
    for the tensor-parallel sizes ``tp`` and FFN step ``ffn_multiple`` (a recipe's); otherwise
    the dense shape (an upper bound).
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from mptool.compress import explicit_target, model_dims
    from mptool.shapes import balanced_target, check_ratio

    d = model_dims(model, config_only=True)
    if d.context and base.seq_len > d.context:
        if seq_len_flag is None:  # the default, 2048, is for large models: a short-context one plans at its context
            base = replace(base, seq_len=d.context)
        else:  # compress refuses it too
            raise MptoolError(f"{seq_len_flag} {base.seq_len} is longer than the model's context "
                              f"(max_position_embeddings {d.context}); give {d.context} or less")
    student = None
    if target is not None and any(v is not None for v in target):
        student = explicit_target(d, target, tp, ffn_multiple)
    elif ratio is not None:
        check_ratio(ratio)
        student = balanced_target(d, ratio, tp, ffn_multiple)
    rows = plan_table(d, gpus, gpu_mem_gib, base, student)
    shape = str(student) if student else "dense shape (upper bound)"
    if as_json:
        print(json.dumps({"model": model or "embedded:SmolLM2-135M-Instruct", "input": asdict(base),
                          "gpu_mem_gib": gpu_mem_gib, "recovery_student": shape, "rows": rows,
                          "host_gram_gib": round(gram_bytes(d) / GIB, 2) if base.compensate else 0.0,
                          "host_weights_gib": {s: {k: round(v / GIB, 2) for k, v in host_weights(
                              d, replace(base, sharding=s), student).items()} for s in ("ddp", "fsdp")}},
                         indent=2))
        return rows
    table = Table(title=f"per-GPU memory (GiB), global batch {base.batch_size} x {base.seq_len} tokens per step "
                        f"(split over the GPUs), "
                        f"LoRA r={base.lora_r}, {base.dtype_bytes}-byte weights, {gpu_mem_gib:g} GiB GPUs, "
                        f"activation checkpointing {'on' if base.checkpointing else 'off'}; "
                        f"recovery student: {shape}")
    for col in ("GPUs", "sharding", "phase", "weights", "gathered", "LoRA+opt", "activations", "logits",
                "teacher", "comp.", "total", "fits"):
        table.add_column(col, justify="right")
    for r in rows:
        p = r["parts_gib"]
        table.add_row(str(r["gpus"]), r["sharding"], r["phase"], f"{p['weights']:.1f}", f"{p['fsdp_gathered']:.1f}",
                      f"{p['lora_and_optimizer']:.2f}", f"{p['activations']:.1f}", f"{p['logits']:.1f}",
                      f"{p['teacher']:.1f}", f"{p['compensation']:.2f}", f"{r['per_gpu_gib']:.1f}",
                      "yes" if r["fits"] else "no")
    console = Console(width=140)
    console.print(table)
    fsdp = host_weights(d, replace(base, sharding="fsdp"), student)
    console.print(f"host memory of weights per process: the loading process holds the dense model, which "
                  f"MaskPrune's end slices a tensor at a time ({fsdp['rank0'] / GIB:.1f} GiB; a one-shot method "
                  f"keeps it beside the sliced copy: {fsdp['rank0_one_shot'] / GIB:.1f} GiB); under FSDP only rank 0 "
                  f"loads, the others take their shards a tensor at a time (~{fsdp['other'] / GIB:.1f} GiB in "
                  "transit); under DDP every process loads the whole model")
    if base.compensate:
        shared = ", ".join(f"{n} GPUs {gram_bytes(d, n) / GIB:.2f}" for n in gpus if n > 1)
        console.print(f"compensation (the default; --no-compensate in compress: none) also holds the input Gram "
                      f"matrices of every o_proj/down_proj in host memory while pruning: "
                      f"{gram_bytes(d) / GIB:.2f} GiB in one process"
                      + (f"; with several (DDP or FSDP) each its share of the layers, GiB per process: {shared}"
                         if shared else ""))
    return rows
