"""Recovery after slicing: LoRA (peft) + distillation from the dense teacher, then merge.

The teacher is either the dense model kept in memory (``teacher="memory"``) or its top-k logits
computed once and cached to disk as safetensors (``teacher="cache"``), so the dense model need
not stay loaded while the student trains. The merged result is a plain checkpoint.

Under ``sharding="fsdp"`` with several processes the student (and a teacher kept in memory) are
sharded with FSDP2; a CPU copy of the sliced student is kept to merge the gathered LoRA into.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from mptool import distributed as D
from mptool.families import get_adapter
from mptool.maskprune import (LORA_TARGETS, LR_SCHEDULES, MaskPruneConfig, autocast, budgeted_steps,
                              check_finite, enable_grad_checkpointing, kd_loss, lm_loss, schedule_factor)


@dataclass
class RecoveryConfig:
    """Knobs of recovery (see docs/maskprune.md)."""

    steps: int = 30
    """Optimisation steps (0: no recovery)."""
    max_tokens: int | None = None
    """Token budget: stop once this many training tokens were seen."""
    batch_size: int = 4
    lr: float = 2e-3
    max_grad_norm: float | None = 1.0
    """LoRA gradients are scaled down to this global L2 norm before each step (None: never); see
    MaskPruneConfig.max_grad_norm."""
    lr_schedule: str = "constant"
    """LoRA learning rate over recovery's steps: "constant", or decayed from ``lr`` towards 0 by
    "linear" or "cosine" (the step's rate is a function of the step alone, so resume is exact)."""
    lora_r: int | None = None
    """Rank of a fresh recovery adapter; None: mask learning's (``maskprune.lora_r``, 16 by
    default). A continued adapter always keeps mask learning's rank."""
    lora_alpha: int | None = None
    """LoRA alpha of a fresh adapter; None: mask learning's (``maskprune.lora_alpha``, 32)."""
    temperature: float = 1.0
    lm_weight: float = 1.0
    """Weight of the next-token loss added to KD."""
    kd: bool = True
    """Ablation: False fine-tunes with the LM loss only (no teacher)."""
    adapter: str = "continue"
    """After MaskPrune: "continue" trains mask learning's own LoRA and AdamW state on, with the masks
    frozen at the final structure, then merges and slices once (one adapter across the cut; the
    teacher is the trained model with adapters off and masks at 1, so ``teacher`` is unused);
    "fresh" merges and slices first, then trains a new adapter on the sliced model (what one-shot
    methods, and MaskPrune with a one-shot ``select``, always get). Measured: docs/maskprune.md."""
    teacher: str = "memory"
    """A fresh adapter's teacher: "memory": the dense model stays loaded; "cache": its top-k logits
    are cached to disk. A continued adapter's teacher is the model itself (adapters off, masks at 1)."""
    cache_topk: int = 64
    bf16: bool = True
    kd_chunk: int | None = 2048
    """Tokens per checkpointed chunk of the KD loss (see MaskPruneConfig)."""
    grad_checkpointing: bool = False
    """Recompute decoder-layer activations in the backward pass (see MaskPruneConfig)."""


def scheduled_lr(cfg: RecoveryConfig, step: int, seq_len: int) -> float:
    """The learning rate of recovery step ``step`` (0-based) under ``cfg.lr_schedule``, decaying
    over the steps recovery will run: ``cfg.steps``, or fewer where ``cfg.max_tokens`` ends it."""
    total = budgeted_steps(cfg.steps, cfg.max_tokens, cfg.batch_size * seq_len)
    return cfg.lr * schedule_factor(cfg.lr_schedule, step, total)


def _topk_kd(student: torch.Tensor, values: torch.Tensor, index: torch.Tensor, t: float) -> torch.Tensor:
    """KD against cached top-k teacher logits (teacher renormalised over its top k)."""
    logp_s = F.log_softmax(student.float() / t, dim=-1).gather(-1, index.long())
    logp_t = F.log_softmax(values.float() / t, dim=-1)
    return (logp_t.exp() * (logp_t - logp_s)).sum(-1).mean() * t * t


def cache_teacher(teacher: Any, blocks: torch.Tensor, batch_size: int, k: int, path: Path,
                  bf16: bool = True, progress: Callable[..., None] | None = None) -> None:
    """Top-k teacher logits for every block, written once to ``path`` (safetensors)."""
    from safetensors.torch import save_file

    values, index = [], []
    dev = next(teacher.parameters()).device
    with torch.no_grad(), autocast(bf16, dev):
        for start in range(0, len(blocks), batch_size):
            logits = teacher(blocks[start:start + batch_size].to(dev)).logits.float()
            top = logits.topk(k, dim=-1)
            values.append(top.values.to(torch.bfloat16).cpu())
            index.append(top.indices.to(torch.int32).cpu())
            if progress:
                progress(1)
    save_file({"values": torch.cat(values), "index": torch.cat(index)}, str(path))


def recover(student: Any, blocks: torch.Tensor, cfg: RecoveryConfig, teacher: Any = None,
            cache_path: Path | None = None, metrics_path: Path | None = None,
            progress: Callable[..., None] | None = None, sharding: str = "ddp",
            device: torch.device | None = None, seed: int = 0, offset: int = 0,
            evaluate: Callable[[Any, str], None] | None = None) -> tuple[Any, list[dict]]:
    """Train LoRA on ``student`` against the teacher, merge, return ``(plain model, history)``.

    ``evaluate(model, when)`` is called on the placed (under FSDP: sharded) LoRA student before
    the first step (``when`` "before": LoRA starts at zero, so it is the sliced student) and after
    the last (``"after"``: the function the merged model computes), on every process, so that
    perplexity can be measured where the shards are.

    ``offset`` is the data position: the first block trained on (the blocks wrap around). After
    mask learning it is the number of blocks mask learning consumed, so that recovery trains on
    new text instead of repeating what the masks were learned on.

    The student (and the teacher) are moved to ``device`` (default: where the student is), or
    sharded onto it under FSDP; the merged model comes back on the CPU. The LoRA initialisation
    depends on ``seed`` only (not on what ran before), so every rank and every sharding starts alike.
    """
    from peft import LoraConfig

    if cfg.teacher not in ("memory", "cache"):
        raise ValueError(f"teacher must be 'memory' or 'cache', got {cfg.teacher!r}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg.lr_schedule!r}")
    if shift := offset % len(blocks):
        blocks = torch.roll(blocks, -shift, dims=0)
    adapter = get_adapter(student.config)
    sharded = D.sharded(sharding)
    dev = device or (D.device() if sharded else next(student.parameters()).device)
    for p in student.parameters():
        p.requires_grad_(False)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(student)
    lora_config = LoraConfig(r=cfg.lora_r or MaskPruneConfig.lora_r, lora_alpha=cfg.lora_alpha or MaskPruneConfig.lora_alpha,
                             lora_dropout=0.0,
                             target_modules=[getattr(adapter, n) for n in LORA_TARGETS])
    if cfg.kd and teacher is not None:  # the dense teacher, sharded like the student or moved to its device
        D.place(teacher, adapter.decoder_layers(teacher), sharded, dev)
    cached = None
    if cfg.kd and cfg.teacher == "cache":
        from safetensors.torch import load_file

        n_blocks = min(len(blocks), cfg.steps * cfg.batch_size)
        if D.world_size() > 1:
            cache_path = cache_path.with_name(f"{cache_path.stem}-rank{D.rank()}{cache_path.suffix}")
        cache_teacher(teacher, blocks[:n_blocks], cfg.batch_size, cfg.cache_topk, cache_path, cfg.bf16)
        cached = load_file(str(cache_path))
        if not sharded:
            teacher.cpu()  # its logits are cached: free the device for the student
    # a sharded student holds a shard only: LoRA is merged into a copy (a skeleton stays one)
    cpu_copy = (copy.deepcopy(student) if D.on_meta(student) else copy.deepcopy(student).cpu()) if sharded else None
    model = _with_lora(student, lora_config, seed)
    D.place(model, adapter.decoder_layers(model.base_model.model), sharded, dev)
    params = [p for p in model.parameters() if p.requires_grad]
    if evaluate is not None:
        model.eval()
        evaluate(model, "before")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    history, tokens = [], 0
    model.train()
    for step in range(cfg.steps):
        if cfg.max_tokens is not None and tokens >= cfg.max_tokens:
            break
        t0 = time.perf_counter()
        idx = [(step * cfg.batch_size + i) % len(blocks) for i in range(cfg.batch_size)]
        ids = D.shard(blocks[idx]).to(dev)
        with autocast(cfg.bf16, dev):
            logits = model(ids).logits
        loss_kd = torch.zeros(())
        if cfg.kd and cached is not None:
            mine = D.shard(torch.tensor(idx))
            loss_kd = _topk_kd(logits, cached["values"][mine].to(dev), cached["index"][mine].to(dev),
                               cfg.temperature)
        elif cfg.kd:
            with torch.no_grad(), autocast(cfg.bf16, dev):
                t_logits = teacher(ids).logits
            loss_kd = kd_loss(logits, t_logits, cfg.temperature, cfg.kd_chunk)
        loss_lm = lm_loss(logits, ids) if (cfg.lm_weight or not cfg.kd) else torch.zeros(())
        loss = loss_kd + (cfg.lm_weight if cfg.kd else 1.0) * loss_lm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not sharded:  # FSDP's reduce-scatter already averaged them
            D.average_grads(params)
        mean_loss = D.mean(loss.item())  # one all-reduce: the check and the row
        check_finite(mean_loss, [], f"recovery step {step + 1}")
        grad_norm = D.clip_grads(params, cfg.max_grad_norm)
        for group in opt.param_groups:
            group["lr"] = scheduled_lr(cfg, step, blocks.shape[1])
        opt.step()
        tokens += ids.numel() * D.world_size()
        row = {"phase": "recovery", "step": step + 1, "tokens": tokens, "loss": mean_loss,
               "kd": D.mean(loss_kd.item()), "lm": D.mean(loss_lm.item()), "grad_norm": grad_norm, "step_s": round(time.perf_counter() - t0, 3)}
        history.append(row)
        if metrics_path is not None and D.is_main():
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if progress:
            progress(1, info=f"loss {row['loss']:.4f}")
    model.eval()
    if evaluate is not None:
        evaluate(model, "after")
    if sharded:
        model = D.unsharded_lora(model, cpu_copy, lora_config)
    merged = model.unload() if D.on_meta(model) else model.merge_and_unload().cpu()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged, history


def _with_lora(model: Any, lora_config: Any, seed: int) -> Any:
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, lora_config)
