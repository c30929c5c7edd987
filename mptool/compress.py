"""`mptool compress`: model + data -> uniform target -> kept units -> sliced plain checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from mptool import distributed as D
from mptool.baselines import METHODS, needs_calibration
from mptool.compensate import compensate
from mptool.config import (WEIGHT_DTYPE_BYTES, CompressConfig, save_config, seed_problems, to_dict, to_saved,
                           with_absolute_paths)
from mptool.data import DATA_ORDERS
from mptool.errors import MptoolError
from mptool.evaluate import PplProtocol, perplexity
from mptool.io import atomic_dir, output_problems
from mptool.maskprune import INITS, LR_SCHEDULES, MASK_NORMS
from mptool.models import check_token_ids, looks_like_path
from mptool.progress import console, step
from mptool.shapes import (Dims, Target, balanced_target, candidates, check_ratio, describe, no_target_message,
                           option_problems, prunable_params, validate_target)
from mptool.surgery import materialize, save_keeps

ONE_SHOT = METHODS
METHODS = ("maskprune", *ONE_SHOT)
BEFORE_RECOVERY = "before-recovery.json"
SPLITS = ("balanced", "kd")


def validate(cfg: CompressConfig, resuming: bool = False) -> None:
    """Checks that need no model: run before anything heavy. ``resuming``: the out is the one the
    checkpoint records, which only --overwrite can change."""
    problems = settings_problems(cfg)
    inputs = tuple(p for p in (cfg.model, cfg.data.train, cfg.data.eval) if p is not None and Path(p).expanduser().exists())
    for path in (cfg.data.train, cfg.data.eval):
        if path is not None and looks_like_path(path) and not Path(path).expanduser().exists():
            problems.append(f"data path {path} does not exist (give a .txt, .jsonl, a folder or a datasets folder)")
    problems += output_problems(cfg.out, cfg.overwrite, sources=inputs,  # --resume refuses --out:
                                remedy="pass --overwrite to replace it (the resumed run writes where its checkpoint "
                                       "says)" if resuming else None)
    if not resuming:
        problems += checkpoint_problems(cfg, inputs)
    if problems:
        raise MptoolError("; ".join(problems))


def settings_problems(cfg: CompressConfig) -> list[str]:
    """What is wrong with the settings alone (no path is looked at), one line each: what
    ``mptool plan`` checks of a recipe, and the first part of :func:`validate`."""
    problems = []
    if cfg.method not in METHODS:
        problems.append(f"--method {cfg.method!r} is not one of {', '.join(METHODS)}")
    if cfg.ratio is not None and cfg.target.is_set():
        problems.append("give either --ratio or an explicit target (--kv-heads/--heads-per-group/--ffn), not both")
    if cfg.ratio is not None:
        try:
            check_ratio(cfg.ratio)
        except MptoolError as e:
            problems.append(str(e))
    for name in ("kv_heads", "heads_per_group", "ffn"):
        value = getattr(cfg.target, name)
        if value is not None and value < 1:
            problems.append(f"--{name.replace('_', '-')} {value} must be >= 1")
    if cfg.sharding not in D.SHARDINGS:
        problems.append(f"--sharding {cfg.sharding!r} is not one of {', '.join(D.SHARDINGS)}")
    if cfg.dtype not in WEIGHT_DTYPE_BYTES:
        problems.append(f"--dtype {cfg.dtype!r} is not one of {', '.join(WEIGHT_DTYPE_BYTES)}")
    if cfg.split not in SPLITS:
        problems.append(f"--split {cfg.split!r} is not one of {', '.join(SPLITS)}")
    elif cfg.split == "kd" and cfg.method == "maskprune":
        problems.append("--split kd is for one-shot methods (--method magnitude|wanda-sp|flap); "
                        "MaskPrune learns its own split")
    elif cfg.split == "kd" and cfg.target.is_set():
        problems.append("--split kd chooses the target within --ratio; give --ratio, not an explicit target")
    if cfg.maskprune.select not in ("learned", *ONE_SHOT):
        problems.append(f"maskprune.select {cfg.maskprune.select!r} is not one of learned, {', '.join(ONE_SHOT)}")
    if cfg.maskprune.init not in INITS:
        problems.append(f"maskprune.init {cfg.maskprune.init!r} is not one of {', '.join(INITS)}")
    sf = cfg.maskprune.snap_frac
    if sf is not None and not 0 <= sf <= 1:
        problems.append(f"maskprune.snap_frac {sf} must be in [0, 1] (or null: the end of the warm-up)")
    mp, rec = cfg.maskprune, cfg.recovery
    if cfg.method == "maskprune" and mp.steps < 1:
        problems.append(f"maskprune.steps (--max-steps) {mp.steps} must be >= 1")
    if rec.steps < 0:
        problems.append(f"recovery.steps (--recovery-steps) {rec.steps} must be >= 0 (0: no recovery)")
    for name, value in (("maskprune.max_tokens (--max-tokens)", mp.max_tokens), ("recovery.max_tokens", rec.max_tokens)):
        if value is not None and value < 1:
            problems.append(f"{name} {value} must be >= 1 (or null: no token budget)")
    world = D.world_size_from_env()
    sizes = (("maskprune.batch_size", mp.batch_size),) if cfg.method == "maskprune" else ()
    for name, value in (*sizes, ("recovery.batch_size", rec.batch_size)):
        if value < 1 or value % world:
            problems.append(f"{name} {value} must be a positive multiple of the {world} processes")
    problems += number_problems(cfg) + seed_problems(cfg.seed)
    if mp.dual not in ("ascent", "exact"):
        problems.append(f"maskprune.dual {mp.dual!r} is not one of ascent, exact")
    if mp.forward not in ("binary", "scaled"):
        problems.append(f"maskprune.forward {mp.forward!r} is not one of binary, scaled")
    if mp.lr_mask_schedule not in LR_SCHEDULES:
        problems.append(f"maskprune.lr_mask_schedule {mp.lr_mask_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    if mp.mask_norm not in MASK_NORMS:
        problems.append(f"maskprune.mask_norm {mp.mask_norm!r} is not one of {', '.join(MASK_NORMS)}")
    if rec.teacher not in ("memory", "cache"):
        problems.append(f"recovery.teacher {rec.teacher!r} is not one of memory, cache")
    if rec.lr_schedule not in LR_SCHEDULES:
        problems.append(f"recovery.lr_schedule {rec.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    if rec.adapter not in ("continue", "fresh"):
        problems.append(f"recovery.adapter {rec.adapter!r} is not one of continue, fresh")
    elif continues_adapter(cfg):  # knobs a continued adapter cannot honour are refused, not ignored
        for name in ("lora_r", "lora_alpha"):
            if getattr(rec, name) is not None and getattr(rec, name) != getattr(mp, name):
                problems.append(f"recovery.{name} {getattr(rec, name)} differs from maskprune.{name} "
                                f"{getattr(mp, name)}: a continued adapter keeps mask learning's; set them "
                                f"equal, or recovery.adapter: fresh for a new adapter")
        if rec.teacher == "cache":
            problems.append("recovery.teacher cache needs a fresh adapter (recovery.adapter: fresh); a continued "
                            "adapter distils from the model itself, with no second copy to cache")
    problems += cfg.ppl.problems()
    if cfg.data.seq_len < 2:
        problems.append(f"data.seq_len (--seq-len) {cfg.data.seq_len} must be >= 2")
    elif cfg.data.calib_tokens < cfg.data.seq_len:
        problems.append(f"data.calib_tokens (--calib-tokens) {cfg.data.calib_tokens} must be at least one "
                        f"block of --seq-len {cfg.data.seq_len} tokens (raise --calib-tokens or lower --seq-len)")
    if cfg.data.order not in DATA_ORDERS:
        problems.append(f"data.order (--data-order) {cfg.data.order!r} is not one of {', '.join(DATA_ORDERS)}")
    problems += option_problems(cfg.tp, cfg.ffn_multiple)
    if cfg.device not in D.DEVICES:
        problems.append(f"--device {cfg.device!r} is not one of {', '.join(D.DEVICES)}")
    return problems


# (section, knob, interval) of every numeric training knob; the interval in the usual notation,
# "[0, inf)" or "(0, 1)". None (where a knob accepts it) is not checked; NaN and inf never pass.
_RANGES = (
    ("maskprune", "lr_mask", "[0, inf)"), ("maskprune", "mask_beta", "[0, 1)"),
    ("maskprune", "lr_lora", "(0, inf)"), ("maskprune", "lora_r", "[1, inf)"),
    ("maskprune", "max_grad_norm", "(0, inf)"), ("recovery", "max_grad_norm", "(0, inf)"),
    ("maskprune", "lora_alpha", "(0, inf)"), ("maskprune", "temperature", "(0, inf)"),
    ("maskprune", "lm_weight", "[0, inf)"), ("maskprune", "rho", "[0, inf)"),
    ("maskprune", "fixed_multiplier", "[0, inf)"), ("maskprune", "lr_target", "[0, inf)"),
    ("maskprune", "warmup_frac", "[0, 1]"), ("maskprune", "hard_frac", "[0, 1]"),
    ("maskprune", "checkpoint_every", "[0, inf)"), ("maskprune", "protect", "[0, inf)"), ("maskprune", "kd_chunk", "[1, inf)"),
    ("recovery", "lr", "(0, inf)"), ("recovery", "lora_r", "[1, inf)"),
    ("recovery", "lora_alpha", "(0, inf)"), ("recovery", "temperature", "(0, inf)"),
    ("recovery", "lm_weight", "[0, inf)"), ("recovery", "cache_topk", "[1, inf)"),
    ("recovery", "kd_chunk", "[1, inf)"),
)


def _inside(value: float, interval: str) -> bool:
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = value >= lo if interval[0] == "[" else value > lo
    below = value <= hi if interval[-1] == "]" else value < hi
    return math.isfinite(value) and above and below


def number_problems(cfg: CompressConfig) -> list[str]:
    """Training knobs out of range (a negative learning rate, a temperature of 0, NaN): caught
    here rather than as a silent no-op or a divergence many steps in."""
    problems = []
    for section, name, interval in _RANGES:
        value = getattr(getattr(cfg, section), name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not _inside(value, interval):
            problems.append(f"{section}.{name} {value} must be a finite number in {interval}")
    return problems


def continues_adapter(cfg: CompressConfig) -> bool:
    """Whether recovery trains mask learning's adapter on (one LoRA across the cut): MaskPrune with
    learned units, recovery steps, ``recovery.adapter: continue``."""
    return (cfg.method == "maskprune" and cfg.maskprune.select == "learned" and cfg.recovery.steps > 0
            and cfg.recovery.adapter == "continue")


def resolve(cfg: CompressConfig) -> CompressConfig:
    """The config as it will run (and be saved): a fresh recovery adapter without its own rank
    takes mask learning's; a continued adapter is checkpointed if either phase asks for it (the
    two phases are one model)."""
    rec = dataclasses.replace(cfg.recovery, lora_r=cfg.recovery.lora_r or cfg.maskprune.lora_r,
                              lora_alpha=cfg.recovery.lora_alpha or cfg.maskprune.lora_alpha)
    mp = cfg.maskprune
    if continues_adapter(cfg) and rec.grad_checkpointing != mp.grad_checkpointing:
        rec = dataclasses.replace(rec, grad_checkpointing=True)
        mp = dataclasses.replace(mp, grad_checkpointing=True)
    return dataclasses.replace(cfg, recovery=rec, maskprune=mp)


def model_dims(model: str | None, trust_remote_code: bool = False, config_only: bool = False) -> Dims:
    """Dims of a model from its config alone (no weights read); refuses unsupported families.

    ``config_only``: a folder holding just ``config.json`` is accepted (planning before download).
    """
    from mptool.models import read_config, resolve_model

    path = resolve_model(model, config_only=config_only)
    return Dims.from_config(read_config(path, trust_remote_code))


def source_weights_dtype(cfg: CompressConfig) -> str | None:
    """The dtype the source checkpoint's config declares (``dtype``, formerly ``torch_dtype``), or None."""
    from mptool.models import read_config, resolve_model

    config = read_config(resolve_model(cfg.model), cfg.trust_remote_code)
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return None if declared is None else str(declared).removeprefix("torch.")


def bf16_use(cfg: CompressConfig, native: bool) -> dict[str, bool]:
    """Whether bf16 autocast was asked (mask learning or recovery), whether the device runs it
    natively, and so whether training used it (:func:`mptool.maskprune.autocast`)."""
    asked = bool(cfg.maskprune.bf16 or cfg.recovery.bf16)
    return {"asked": asked, "native": native, "used": asked and native}


def context_check(cfg: CompressConfig, context: int | None) -> None:
    """Training blocks and evaluation windows must fit the positions the model was built for."""
    problems = cfg.ppl.context_problems(context)
    if context and cfg.data.seq_len > context:
        problems.insert(0, f"data.seq_len (--seq-len) {cfg.data.seq_len} is longer than the model's "
                           f"context (max_position_embeddings {context}): give --seq-len {context} or less")
    if problems:
        raise MptoolError("; ".join(problems))


def resolve_target(cfg: CompressConfig, d: Dims) -> Target:
    """The uniform target: explicit (validated against the engine rules) or from the ratio."""
    if cfg.target.is_set():
        return explicit_target(d, (cfg.target.kv_heads, cfg.target.heads_per_group, cfg.target.ffn), cfg.tp,
                               cfg.ffn_multiple)
    return balanced_target(d, cfg.ratio_or_default, cfg.tp, cfg.ffn_multiple)


def explicit_target(d: Dims, sizes: tuple[int | None, int | None, int | None], tp: Any = (1,),
                    ffn_multiple: int = 64) -> Target:
    """``(kv_heads, heads_per_group, ffn)`` as a target (None keeps the dense size), checked
    against the engine rules (an illegal one names the nearest legal ones)."""
    kv, hpg, ffn = sizes
    t = Target(kv or d.num_kv_heads, hpg or d.heads_per_group, ffn or d.intermediate_size)
    validate_target(d, t, tp, ffn_multiple)
    return t


def eval_text_for(path: str | None) -> tuple[str, str]:
    """(held-out text, its name): the user's evaluation text, or Austen's Persuasion."""
    from mptool.data import default_texts, load_texts

    if path is None:
        return default_texts()[1], "austen:persuasion"
    return "\n\n".join(load_texts(path, role="eval")), path


def held_out_overlap(cfg_data: Any, texts: list[str] | None = None, eval_text: str | None = None) -> str | None:
    """Why the evaluation text is (partly) training text, if it visibly is: the same path for
    both, a training folder holding the default held-out book, or passages of the evaluation
    text found verbatim in the training text (a copy under another name)."""
    from mptool.data import EVAL_BOOK, splits_apart

    if cfg_data.train is None or not Path(cfg_data.train).expanduser().exists():
        return None
    train = Path(cfg_data.train).expanduser().resolve()
    if cfg_data.eval is not None:
        held = Path(cfg_data.eval).expanduser()
        if held.exists() and held.resolve() == train and not splits_apart(train):
            return f"--data and --eval-data are the same ({cfg_data.train})"
    else:
        book = f"{EVAL_BOOK}.txt"
        if train.name == book or (train.is_dir() and (train / book).is_file()):
            return f"--data {cfg_data.train} holds {book}, the default held-out text"
    if texts and eval_text and len(eval_text) >= 4 * _PROBE_CHARS:
        probes = [eval_text[int(f * (len(eval_text) - _PROBE_CHARS)):][:_PROBE_CHARS] for f in (0.1, 0.5, 0.9)]
        found = sum(any(p in t for t in texts) for p in probes)
        if found >= 2:
            return (f"{found} of 3 passages of the evaluation text ({cfg_data.eval or EVAL_BOOK}) appear word for "
                    f"word in --data {cfg_data.train}")
    return None


_PROBE_CHARS = 200  # long enough that a verbatim match is a copy, not a shared phrase


def load_texts_for(cfg_data: Any) -> tuple[list[str], str, str]:
    """(training texts, evaluation text, evaluation text name).

    Training data is read first so a bad ``--data`` fails before anything else is loaded.
    """
    from mptool.data import default_texts, load_texts

    train = load_texts(cfg_data.train) if cfg_data.train is not None else [default_texts()[0]]
    return (train, *eval_text_for(cfg_data.eval))


def short_eval_note(ids: torch.Tensor, asked: int) -> str | None:
    """A note when the evaluation text is shorter than ``--eval-tokens`` asks (the perplexity is then
    over fewer tokens than the protocol says; the report's ``tokens`` records how many)."""
    if ids.numel() >= asked:
        return None
    return (f"note: the evaluation text holds {ids.numel():,} tokens of the {asked:,} asked (--eval-tokens): "
            f"perplexity over {max(ids.numel() - 1, 0):,} predicted tokens" +
            ("; too few to compare models by" if ids.numel() < 1024 else ""))


def measure_ppl(model: Any, ids: torch.Tensor, protocol: PplProtocol, label: str,
                device: torch.device | None = None) -> dict[str, Any]:
    """Held-out perplexity; the model is moved to ``device`` first when one is given."""
    if device is not None:
        model.to(device)
    with step(f"perplexity ({label})", total=min(ids.numel(), protocol.max_tokens)) as advance:
        return perplexity(model, ids, protocol, progress=advance)


def trainer_ppl(trainer: Any, ids: torch.Tensor, protocol: PplProtocol, label: str,
                dense: bool = False) -> dict[str, Any]:
    """Held-out perplexity of a MaskPrune trainer's model (``dense``: its teacher), every process
    of the run taking a share of the windows."""
    with step(f"perplexity ({label})", total=min(ids.numel(), protocol.max_tokens)) as advance:
        return trainer.perplexity(ids, protocol, dense=dense, progress=advance)


def one_shot_scores(model: Any, methods: tuple[str, ...], blocks: torch.Tensor, protect: float = 0.0,
                    gram: bool = False, deal: bool = True) -> tuple[dict[str, Any], torch.Tensor, tuple[list, list] | None]:
    """Unit scores of one-shot methods, from one calibration pass where the model's weights are
    (none when only magnitude is asked for and nothing is protected or compensated), the FFN
    channels that ``protect`` keeps (:func:`mptool.baselines.massive_channels`; none with
    ``protect`` 0), and with ``gram`` the input Gram matrices of every o_proj and down_proj
    (for :mod:`mptool.compensate`; else None).

    Under several processes rank 0 alone calibrates and every rank takes its scores (one set of
    numbers for all, so a kernel's rounding on one GPU cannot give one rank other units or other
    deltas) and the Gram matrices of its share of the layers (:func:`mptool.distributed.to_owners`;
    None for the others' layers), whose compensation it solves for every rank; without ``deal``
    rank 0 keeps them all and the others get None (rank 0 alone holds weights and cuts)."""
    from mptool.baselines import Scores, calibrate, one_shot_results

    methods = tuple(dict.fromkeys(methods))
    grams = None
    if D.is_main():
        o_stats = d_stats = None
        if needs_calibration(methods, protect, gram):
            with step(f"calibrate ({len(blocks)} x {blocks.shape[1]} tokens)", total=len(blocks)) as advance:
                o_stats, d_stats = calibrate(model, blocks, progress=advance, gram=gram)
        scored, protected, grams = one_shot_results(model, methods, o_stats, d_stats, protect, gram)
        del o_stats, d_stats  # grams holds the Gram matrices now, and to_owners drops each one sent
        flat = [t for s in scored.values() for t in (s.heads, s.groups, s.ffn)] + [protected]
        if D.world_size() > 1:  # every rank the same numbers on the same device
            flat = [t.cpu() for t in flat]
    flat = D.from_rank0(flat if D.is_main() else None)
    scored = {m: Scores(*flat[3 * i:3 * i + 3]) for i, m in enumerate(methods)}
    if gram and D.world_size() > 1 and deal:  # rank 0 kept every layer's; the others have none yet
        grams = tuple(D.to_owners(g) for g in (grams or (None, None)))
    return scored, flat[3 * len(methods)].bool(), grams if gram else None


def check_protected(protected: torch.Tensor, factor: float) -> None:
    """Refuse a ``maskprune.protect`` so low that it would pin a large part of a layer: protection
    is for the handful of channels that write massive activations, not a second ranking."""
    per_layer = protected.sum(1)
    worst = int(per_layer.argmax())
    if int(per_layer[worst]) > protected.shape[1] // 8:
        raise MptoolError(f"maskprune.protect {factor} protects {int(per_layer[worst])} of layer {worst}'s "
                          f"{protected.shape[1]} FFN channels (more than 1/8): give a larger factor "
                          f"(default 100: channels writing 100x their layer's median) or 0 for none")


def protected_report(protected: torch.Tensor) -> dict[str, list[int]]:
    """The protected FFN channels of each layer that has any, for the report."""
    from mptool.masks import mask_indices

    return {str(layer): mask_indices(row.float()) for layer, row in enumerate(protected) if row.any()}


def param_count(model: Any) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def plan_target(cfg: CompressConfig, d: Dims) -> tuple[Target | None, float | None]:
    """(fixed target, None) or, for MaskPrune or ``--split kd`` with a ratio, (None, parameter
    budget) to choose the target under."""
    if (cfg.method == "maskprune" or cfg.split == "kd") and not cfg.target.is_set():
        budget = (1.0 - cfg.ratio_or_default) * prunable_params(d, d.dense_target())
        if not candidates(d, cfg.ratio_or_default, cfg.tp, cfg.ffn_multiple):  # before any work, not at the snap
            raise MptoolError(no_target_message(d, budget, cfg.tp, cfg.ffn_multiple))
        return None, budget
    return resolve_target(cfg, d), None


def checkpoint_dir(cfg: CompressConfig) -> Path:
    out = Path(cfg.out).expanduser()
    return out.parent / f"{out.name}.ckpt"


def _work_dir(ckpt: Path) -> Path:
    """The checkpoint's sibling for metrics and a cached teacher while a run is on."""
    return ckpt.parent / f".{ckpt.name}.work"


def _ours(folder: Path, marker: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether ``folder`` holds only what a run writes there (an empty folder counts), or ``marker``."""
    if not folder.is_dir():
        return False
    if marker is not None and (folder / marker).is_file():
        return True
    return all(any(p.match(pattern) for pattern in allowed) for p in folder.iterdir())


def checkpoint_problems(cfg: CompressConfig, inputs: tuple = ()) -> list[str]:
    """What stops a fresh run from using ``<out>.ckpt`` and its work folder, which it clears at
    the start and removes at the end: a folder there that a run did not write (refused even with
    --overwrite: it is not this command's output), one that is or holds an input or the current
    directory, or an interrupted run's checkpoint without --overwrite."""
    ckpt = Path(os.path.abspath(checkpoint_dir(cfg)))  # normalised, links not followed
    work = _work_dir(ckpt)
    held = [Path(p).expanduser().resolve() for p in inputs] + [Path.cwd().resolve()]
    problems = []
    for folder, marker, allowed in ((ckpt, "compress-config.yaml", ()),
                                    (work, None, ("metrics.jsonl", "teacher-topk*.safetensors"))):
        if not folder.exists() and not folder.is_symlink():
            continue
        real = folder.resolve()
        if any(real == p or real in p.parents for p in held):
            problems.append(f"{folder}, where a run with --out {cfg.out} keeps its checkpoint, is or holds an input "
                            f"or the current directory; give another --out")
        elif folder.is_symlink() or not _ours(folder, marker, allowed):
            problems.append(f"{folder} exists and was not written by mptool compress; a run with --out {cfg.out} "
                            f"keeps its checkpoint there and would delete it: move it, or give another --out")
    if not problems and not cfg.overwrite and (ckpt / "compress-config.yaml").is_file():
        given = checkpoint_dir(cfg)  # as the user spelt --out
        problems.append(f"{given} holds the checkpoint of an interrupted run that a fresh run would "
                        f"discard; continue it with mptool compress --resume {given}, or pass "
                        f"--overwrite to start afresh")
    return problems


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _before_resume(row: dict, st: Any) -> bool:
    """Whether a metrics row was logged at or before the checkpoint being resumed (``st``)."""
    if row.get("phase", "mask") == "mask":
        return row.get("step", 0) <= (st.step if st.frozen_at is None else st.frozen_at)
    # recovery rows count from the cut; a fresh adapter's recovery is never resumed: it restarts
    return st.frozen_at is not None and st.frozen_at + row.get("step", 0) <= st.step


def compress(cfg: CompressConfig, resume: str | Path | None = None) -> dict[str, Any]:
    """Run the whole compress job; returns the report (also written to ``<out>/report.json``).

    Stages: dense perplexity -> kept units (MaskPrune or a one-shot score) -> slice ->
    recovery (LoRA + KD, optional) -> held-out perplexity -> atomic write of checkpoint, report,
    metrics and plots. MaskPrune checkpoints every ``maskprune.checkpoint_every`` steps into
    ``<out>.ckpt``; ``resume`` continues from such a folder.
    """
    from mptool.data import eval_token_stream, token_blocks
    from mptool.models import load_model

    validate(cfg, resuming=resume is not None)
    cfg = resolve(cfg)
    D.init_from_env(cfg.device)
    main = D.is_main()
    weights_dtype = getattr(torch, cfg.dtype)

    dev = D.device(cfg.device)
    sharded = D.sharded(cfg.sharding)
    # under FSDP, MaskPrune with its learned selection and the one-shot methods need the whole
    # weights on rank 0 only (to calibrate, cut, evaluate and write): the other ranks hold
    # meta-device skeletons and take their shards of rank 0's tensors when FSDP wraps a model
    # (mptool.distributed.fsdp_wrap) for mask learning or recovery
    rank0_load = sharded and (cfg.method != "maskprune" or cfg.maskprune.select == "learned")
    weights_here = main or not rank0_load

    def load(what: str) -> tuple[Any, Any]:
        """The model (a skeleton where this rank loads no weights) and tokenizer; one outcome for all."""
        error, loaded = None, (None, None)
        try:
            with console.status(what) if main else contextlib.nullcontext():
                loaded = load_model(cfg.model, dtype=weights_dtype, trust_remote_code=cfg.trust_remote_code,
                                    weights=weights_here)
        except MptoolError as exc:
            error = exc
        if not D.every(error is None):  # the others stop too instead of waiting at a collective
            raise error or MptoolError("another process of this run could not load the model (rank 0 says why)")
        return loaded

    def load_dense() -> Any:
        return load("loading the dense model again")[0]
    # under FSDP the weights stay on the CPU until FSDP moves each process's shard to the device;
    # rank 0 still evaluates the written model whole on its device
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    dims = model_dims(cfg.model, cfg.trust_remote_code)
    context_check(cfg, dims.context)
    fixed, budget = plan_target(cfg, dims)  # an illegal target is refused before any work
    texts, eval_text, eval_name = load_texts_for(cfg.data)  # (the default text's first extraction included)
    overlap = held_out_overlap(cfg.data, texts, eval_text)
    source_dtype = source_weights_dtype(cfg)
    if main and source_dtype not in (None, cfg.dtype):
        console.print(f"note: the source weights are {source_dtype}; training runs and the result is written in "
                      f"{cfg.dtype} (--dtype {source_dtype} keeps the source's)")
    # several processes: each keeps the Gram matrices of its share of the layers and solves their
    # compensation for all; a one-shot method's are calibrated on rank 0, which deals them out
    # (under FSDP rank 0 alone cuts a one-shot model: it keeps them all and the others none)
    alone = rank0_load and cfg.method != "maskprune"
    shares = D.world_size()
    owners = D.owner if shares > 1 and not alone else None
    whole = int(shares > 1 and cfg.method != "maskprune")
    if cfg.compensate is None:  # auto: on where the Gram matrices fit the host (recorded as decided)
        from mptool.compensate import fits, host_gram_bytes

        # every rank reads its host's free memory at its own moment: they act on one decision
        local = 1 if alone else D.processes_per_host()
        cfg = dataclasses.replace(cfg, compensate=D.every(fits(dims, local, shares=shares, whole=whole)))
        if not cfg.compensate and main:
            console.print(f"compensation off: its Gram matrices need {host_gram_bytes(dims, local, shares, whole) / 2**30:.1f} GiB "
                          f"of host memory ({local} process(es) on this host), more than half of what is available "
                          "(--compensate forces it)")
    model, tokenizer = load("loading model")
    if not sharded:
        model.to(dev)
    d = Dims.from_config(model.config)
    dense_count = param_count(model)
    if main:
        console.print(f"dense {d.dense_target()} -> " + (f"target {fixed}" if fixed else
                      f"{'learned' if cfg.method == 'maskprune' else 'KD-chosen'} target within "
                      f"{budget:,.0f} prunable parameters"))
    eval_ids = eval_token_stream(tokenizer, eval_text, cfg.ppl.max_tokens)
    check_token_ids(eval_ids, model, tokenizer, "evaluation text")
    protocol = cfg.ppl.protocol(eval_name, d.context)
    # one cut of the training text: calibration is its first blocks (in either order the first k
    # blocks of a shorter cut are those of a longer one), training the first ``train_blocks``
    mask_cfg, rec_cfg = cfg.maskprune, cfg.recovery
    # MaskPrune's steps, or the probe batch of --split kd (the same first blocks MaskPrune probes);
    # recovery after MaskPrune continues where mask learning stopped (new text, not a second pass)
    first = (mask_cfg.steps * mask_cfg.batch_size if cfg.method == "maskprune"
             else mask_cfg.batch_size if fixed is None else 0)
    rec_blocks = rec_cfg.steps * rec_cfg.batch_size
    train_blocks = max(1, first + rec_blocks if cfg.method == "maskprune" else max(first, rec_blocks))
    calib_blocks = cfg.data.calib_tokens // cfg.data.seq_len
    cut = token_blocks(tokenizer, texts, cfg.data.seq_len, max(train_blocks, calib_blocks) * cfg.data.seq_len,
                       order=cfg.data.order)
    calib, blocks = cut[:calib_blocks], cut[:train_blocks]
    check_token_ids(cut, model, tokenizer, "training text")
    data_used = {"seq_len": cfg.data.seq_len, "calib_blocks": len(calib), "calib_blocks_asked": calib_blocks,
                 "train_blocks": train_blocks, "distinct_train_blocks": len(blocks),
                 "eval_tokens": int(eval_ids.numel()), "eval_tokens_asked": cfg.ppl.max_tokens}
    if main and (note := short_eval_note(eval_ids, cfg.ppl.max_tokens)):
        console.print(note)
    short = ([f"calibration uses {len(calib)} of the {calib_blocks} asked (--calib-tokens)"]
             if len(calib) < calib_blocks else [])
    if len(blocks) < train_blocks:
        short.append(f"training passes over {len(blocks)} distinct blocks {train_blocks / len(blocks):.1f} times")
    if main and short:  # the report's data_used records the same
        console.print(f"note: the training text holds {len(cut)} blocks of {cfg.data.seq_len} tokens: {'; '.join(short)}")
    # several processes run MaskPrune: the dense perplexity is measured on the wrapped model
    # (adapters off, masks at 1), each process a share of the windows, where the shards are
    spread = D.world_size() > 1 and cfg.method == "maskprune"
    dense_ppl = measure_ppl(model, eval_ids, protocol, "dense", dev) if main and not spread else {}
    if sharded and main:
        model.cpu()

    ckpt = Path(resume) if resume else checkpoint_dir(cfg)
    ckpt_parent = _work_dir(ckpt)
    if not resume:  # a fresh run (validate refused one over a checkpoint without --overwrite) starts clean:
        if main:  # an earlier run's checkpoint and metrics must not mix with this one's
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(ckpt_parent, ignore_errors=True)
        D.barrier()
    ckpt_parent.mkdir(parents=True, exist_ok=True)  # every rank: harmless, and exists before use
    with _work_folder(ckpt_parent, ckpt, resumable=cfg.method == "maskprune"):
        metrics = ckpt_parent / "metrics.jsonl"
        history: list[dict] = []
        extra: dict[str, Any] = {}

        from mptool.maskprune import native_bf16

        bf16 = bf16_use(cfg, native_bf16(dev.type))
        # said here, after every input check (an error stays one line), where training starts
        if main and bf16["asked"] and not bf16["native"] and (cfg.method == "maskprune" or rec_cfg.steps > 0):
            console.print(f"note: this {dev.type.upper()} "
                          f"({torch.backends.cpu.get_cpu_capability() if dev.type == 'cpu' else dev}) "
                          "has no native bf16 matrix products, where bf16 runs many times slower than fp32: "
                          "training computes in float32 instead of bf16 autocast"
                          + (" (--dtype bfloat16 weights still multiply in bf16: --dtype float32 is faster here)"
                             if cfg.dtype == "bfloat16" else ""))
        t0 = time.perf_counter()
        data_offset = 0  # blocks consumed before recovery
        pruned_ppl = None
        # recovery after MaskPrune continues mask learning's adapter on the frozen masks (one LoRA
        # across the cut) unless asked for a fresh one; a one-shot selection has no adapter to continue
        continued = continues_adapter(cfg)
        if cfg.method == "maskprune":
            from mptool.maskprune import MaskPrune

            # the dense model's scores for the initialisation and a one-shot selection, one calibration:
            # with several processes on the trainer's model, each process a share of the blocks (under
            # FSDP where its shards are), and each keeps the Gram matrices of its share of the layers
            methods = tuple(m for m in (mask_cfg.init, mask_cfg.select) if m in ONE_SHOT)
            if D.world_size() == 1:
                scored, protected, grams = one_shot_scores(model, methods, calib, mask_cfg.protect, gram=cfg.compensate)
                check_protected(protected, mask_cfg.protect)
            trainer = MaskPrune(model, blocks, mask_cfg, target=fixed, budget=budget, tp=tuple(cfg.tp),
                                ffn_multiple=cfg.ffn_multiple, seed=cfg.seed, sharding=cfg.sharding, device=dev,
                                defer=True)
            if D.world_size() > 1:
                with step(f"calibrate ({len(calib)} x {calib.shape[1]} tokens over {D.world_size()} processes)",
                          total=len(calib) if needs_calibration(methods, mask_cfg.protect, cfg.compensate) else 0
                          ) as advance:
                    scored, protected, grams = trainer.calibrate(methods, calib, mask_cfg.protect,
                                                                 gram=cfg.compensate, progress=advance)
                check_protected(protected, mask_cfg.protect)
            trainer.start(scored.get(mask_cfg.init), protected, grams)
            if continued:
                trainer.continue_with(rec_cfg)
            trainer.extra_files = {"compress-config.yaml": to_saved(cfg)}
            if resume:
                trainer.load_checkpoint(ckpt)  # with the protected set the run began with
                if main:  # one writer; the others wait so that nobody appends before the rewrite
                    kept = [r for r in _read_jsonl(metrics) if _before_resume(r, trainer.state)]
                    metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
                D.barrier()
                if main:
                    console.print(f"resumed from {ckpt} at step {trainer.state.step}")
            elif main:
                metrics.unlink(missing_ok=True)
            if spread:
                dense_ppl = trainer_ppl(trainer, eval_ids, protocol, "dense", dense=True)
            if trainer.protected.any():
                extra["protected_ffn"] = protected_report(trainer.protected)
                if main:
                    console.print(f"protected {int(trainer.protected.sum())} FFN channels that write massive "
                                  f"activations (layers {', '.join(extra['protected_ffn'])})")
            st = trainer.state
            with step("mask learning", total=mask_cfg.steps) as advance:
                advance(st.step if st.frozen_at is None else mask_cfg.steps)
                history = trainer.run(metrics, ckpt, progress=advance)
            if continued:
                trainer.freeze()  # the masked model now computes exactly what the sliced one will
                saved = ckpt / BEFORE_RECOVERY
                if st.step > st.frozen_at and D.every(saved.is_file()):  # resumed mid-recovery: measured then
                    extra["before_recovery"] = json.loads(saved.read_text())
                else:  # the masked model computes what the sliced one will; every process takes part
                    extra["before_recovery"] = trainer_ppl(trainer, eval_ids, protocol, "pruned, before recovery")
                if "before_recovery" in extra:  # kept in recovery's checkpoints for a resumed run's report
                    trainer.extra_files[BEFORE_RECOVERY] = json.dumps(extra["before_recovery"])
                t1 = time.perf_counter()
                with step("recovery (LoRA + KD, mask learning's adapter continued)", total=rec_cfg.steps) as advance:
                    advance(st.step - st.frozen_at)
                    trainer.run_recovery(metrics, ckpt, progress=advance)
                timings["recovery_s"] = round(time.perf_counter() - t1, 1)
                if spread and mask_cfg.select == "learned":
                    # several processes: the final perplexity on the wrapped model, where the shards
                    # are, before slicing (the same function: finish() folds the masks and merges
                    # LoRA exactly), so the whole pruned model never has to fit rank 0's device
                    pruned_ppl = {**trainer_ppl(trainer, eval_ids, protocol, "pruned"),
                                  "measured_on": "the trained masked model before slicing, over the processes"}
            if mask_cfg.select != "learned":  # MaskPrune's shape only: the dense weights cut by a one-shot score
                from mptool.baselines import protect, select

                shape = trainer.keeps()[0].target()
                model = load_dense()  # the trainer's model carries LoRA; this one is also recovery's teacher
                # the protected set the run began with (a resumed trainer restored it from its checkpoint)
                keeps = select(protect(scored[mask_cfg.select], trainer.protected), shape)
                pruned = materialize(model.cpu(), keeps)
                if grams is not None:
                    compensate(model, keeps, *grams, into=pruned, protected=trainer.protected, owner=owners)
            else:
                pruned, keeps = trainer.finish(reload=load_dense)
                model = None  # LoRA was merged into these weights: recovery reloads the dense teacher
            history = _read_jsonl(metrics) or history
            mask_rows = [r for r in history if r.get("phase", "mask") == "mask"]
            data_offset = trainer.state.step * mask_cfg.batch_size
            extra["maskprune"] = {
                "steps": st.frozen_at if continued else st.step,
                "tokens": st.frozen_tokens if continued else st.tokens,
                "final_violation": mask_rows[-1]["hard_violation"] if mask_rows else None,
                "binarity": mask_rows[-1]["binarity"] if mask_rows else None,
                "learned_targets": [mask_rows[-1]["s_kv"], mask_rows[-1]["s_heads"], mask_rows[-1]["s_ffn"]] if mask_rows else None,
                "step_s_median": _median([r["step_s"] for r in mask_rows]),
                "candidate_kd": st.snap_scores,
            }
            if continued:
                rec_rows = [r for r in history if r.get("phase") == "recovery"]
                extra["recovery"] = {"adapter": "continued", "steps": len(rec_rows),
                                     "tokens": rec_rows[-1]["tokens"] if rec_rows else 0,
                                     "first_block": (st.frozen_at * mask_cfg.batch_size) % len(blocks), "blocks": len(blocks),
                                     "step_s_median": _median([r["step_s"] for r in rec_rows])}
            del trainer
        else:
            from mptool.baselines import select

            scored, _, grams = one_shot_scores(model, (cfg.method,), calib, gram=cfg.compensate, deal=not alone)
            scores = scored[cfg.method]
            if fixed is None:  # --split kd
                from mptool.baselines import kd_split

                cands = candidates(d, cfg.ratio_or_default, cfg.tp, cfg.ffn_multiple)
                chosen = None
                if main or not alone:  # every process a share of the solves, or rank 0 alone
                    with console.status(f"scoring {len(cands)} legal targets by KD on a probe batch"):
                        chosen = kd_split(model, scores, cands, blocks[: mask_cfg.batch_size], rec_cfg.temperature,
                                          rec_cfg.kd_chunk, rec_cfg.bf16, grams=grams, owner=owners)
                fixed, extra["candidate_kd"] = D.object_from_rank0(chosen) if alone else chosen
            keeps = select(scores, fixed)
            pruned = materialize(model if D.on_meta(model) else model.cpu(), keeps)  # a skeleton stays one
            if grams is not None and (main or not alone):
                compensate(model, keeps, *grams, into=pruned, owner=owners)
        timings["prune_s"] = round(time.perf_counter() - t0 - timings.get("recovery_s", 0.0), 1)
        target = keeps[0].target()

        if rec_cfg.steps > 0 and not continued:
            from mptool.recover import recover

            measured: dict[str, dict] = {}

            def evaluate(student: Any, when: str) -> None:
                """Several processes: the student's perplexity where its shards are, before and after
                (inside recovery's progress bar, so without one of its own)."""
                from mptool.evaluate import perplexity

                measured[when] = {**perplexity(student, eval_ids, protocol, split=True),
                                  "measured_on": "the LoRA student before merging, over the processes"}

            if main and not spread:
                extra["before_recovery"] = measure_ppl(pruned, eval_ids, protocol, "pruned, before recovery", dev)
            t0 = time.perf_counter()
            if model is None:
                model = load_dense()
            with step(f"recovery (LoRA + KD, teacher in {rec_cfg.teacher})", total=rec_cfg.steps) as advance:
                pruned, rec_history = recover(pruned, blocks, rec_cfg, teacher=model,
                                              cache_path=ckpt_parent / "teacher-topk.safetensors",
                                              metrics_path=metrics, progress=advance,
                                              sharding=cfg.sharding, device=dev, seed=cfg.seed,
                                              offset=data_offset, evaluate=evaluate if spread else None)
            if spread:
                extra["before_recovery"], pruned_ppl = measured["before"], measured["after"]
            history += rec_history
            timings["recovery_s"] = round(time.perf_counter() - t0, 1)
            extra["recovery"] = {"adapter": "fresh", "steps": len(rec_history), "tokens": rec_history[-1]["tokens"] if rec_history else 0,
                                 "first_block": data_offset % len(blocks), "blocks": len(blocks),
                                 "step_s_median": _median([r["step_s"] for r in rec_history])}
        del model
        rss = D.gather_floats(peak_rss_mb())  # the other ranks' peaks: they do nothing more
        if not main:  # rank 0 evaluates and writes
            D.barrier()
            return {}
        if pruned_ppl is None:
            pruned_ppl = measure_ppl(pruned, eval_ids, protocol, "pruned", dev)
        timings["total_s"] = round(time.perf_counter() - started, 1)
        timings["peak_rss_mb"] = round(peak_rss_mb(), 1)
        if len(rss) > 1:
            extra["processes"] = {"count": len(rss), "sharding": cfg.sharding,
                                  "weights_loaded_by": "rank 0" if rank0_load else "every rank",
                                  "gram_matrices": (None if not cfg.compensate else "rank 0 all layers" if alone
                                                    else "each rank its share of the layers"
                                                    + (" (rank 0 all of them while it calibrated)" if whole else "")),
                                  "peak_rss_mb": [timings["peak_rss_mb"], *(round(r, 1) for r in rss[1:])]}

        report = build_report(cfg, d, target, dense_count, pruned, dense_ppl, pruned_ppl, timings)
        report.update(extra, data_used=data_used, dtype={"source": source_dtype, "written": cfg.dtype},
                      bf16_autocast=bf16)
        if not cfg.target.is_set():  # what --ratio (or its default) asked, against what the grid allows
            largest = candidates(d, cfg.ratio_or_default, cfg.tp, cfg.ffn_multiple)[0]
            report["ratio"] = {"asked": cfg.ratio_or_default, "largest_legal_removes": round(
                1 - prunable_params(d, largest) / prunable_params(d, d.dense_target()), 6)}
        if overlap:
            report["held_out_warning"] = overlap
        with atomic_dir(cfg.out) as tmp:
            pruned.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            save_keeps(keeps, tmp / "keeps.json")
            save_config(cfg, tmp / "mptool-config.yaml")
            (tmp / "report.json").write_text(json.dumps(report, indent=2))
            if history:
                from mptool.plots import training_curves

                (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
                training_curves(history, tmp / "training.png")
            from mptool.plots import kept_heatmap

            kept_heatmap(keeps, d.num_kv_heads, d.heads_per_group, d.intermediate_size, tmp / "kept_units.png")
        shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(ckpt_parent, ignore_errors=True)
    D.barrier()
    print_report(report)
    if overlap:
        console.print(f"[yellow]warning:[/yellow] {overlap}: the perplexities are not on held-out text")
    return report


@contextlib.contextmanager
def _work_folder(path: Path, ckpt: Path, resumable: bool) -> Iterator[None]:
    """On failure a run that cannot be resumed (a one-shot method, or MaskPrune stopped before its
    first checkpoint) leaves no work folder behind; a resumable one keeps its checkpoint and
    metrics but not a cached teacher (rebuilt on resume), and on Ctrl-C or SIGTERM says how to
    continue."""
    try:
        yield
    except BaseException as e:
        if resumable and (ckpt / "compress-config.yaml").is_file():
            for cache in path.glob("teacher-topk*.safetensors"):
                cache.unlink(missing_ok=True)
            if isinstance(e, (KeyboardInterrupt, SystemExit)) and D.is_main():
                console.print(f"stopped; continue from the last checkpoint with: mptool compress --resume {ckpt}")
        else:
            shutil.rmtree(path, ignore_errors=True)
        raise


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def build_report(cfg: CompressConfig, d: Dims, target: Target, dense_count: int, pruned: Any,
                 dense_ppl: dict, pruned_ppl: dict, timings: dict) -> dict[str, Any]:
    import transformers

    dense_desc, pruned_desc = describe(d, d.dense_target()), describe(d, target)
    dense_desc["params_counted"] = dense_count
    pruned_desc["params_counted"] = param_count(pruned)
    return {
        "mptool_report": 1,
        "command": " ".join(sys.argv) if sys.argv and "mptool" in sys.argv[0] else None,
        "model": cfg.model or "embedded:SmolLM2-135M-Instruct",
        "method": cfg.method,
        "ratio_requested": cfg.ratio if cfg.ratio is not None else (None if cfg.target.is_set() else CompressConfig.DEFAULT_RATIO),
        "architecture": pruned.config.architectures[0],
        "dense": {**dense_desc, "perplexity": dense_ppl},
        "pruned": {**pruned_desc, "perplexity": pruned_ppl},
        "prunable_removed": round(1 - pruned_desc["prunable_params"] / dense_desc["prunable_params"], 4),
        "ppl_ratio": round(pruned_ppl["ppl"] / dense_ppl["ppl"], 4),
        "compensated": bool(cfg.compensate),  # kept columns absorbed the dropped units (mptool.compensate)
        "config": to_dict(with_absolute_paths(cfg)),
        "timings": timings,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "threads": torch.get_num_threads()},
    }


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mptool compress ({report['method']})")
    for col in ("", "KV heads", "heads/group", "heads", "FFN", "params", "prunable", "ppl"):
        table.add_column(col, justify="right")
    for name in ("dense", "pruned"):
        r = report[name]
        table.add_row(name, str(r["kv_heads"]), str(r["heads_per_group"]), str(r["num_attention_heads"]),
                      str(r["ffn"]), f"{r['total_params']:,}", f"{r['prunable_params']:,}",
                      f"{r['perplexity']['ppl']:.2f}")
    Console(width=120).print(table)
    console.print(f"removed {report['prunable_removed']:.1%} of prunable parameters; "
                  f"perplexity x{report['ppl_ratio']:.2f} on {report['pruned']['perplexity']['protocol']['text']}")
    ratio = report.get("ratio")
    removed = report["prunable_removed"]
    if ratio and removed - ratio["asked"] > 0.02:  # the legal grid is coarse on small models, or the method chose
        asked, nearest = ratio["asked"], ratio["largest_legal_removes"]
        rule = ("its KD shape rule" if report["method"] == "maskprune" or report["config"]["split"] == "kd"
                else "the balanced split (--split kd scores the shapes instead)")
        why = (f"the largest legal uniform shape within it removes {nearest:.1%}" if removed - nearest < 1e-6 else
               f"the largest legal uniform shape within it removes {nearest:.1%}, but {report['method']} chose a "
               f"smaller one by {rule}; --kv-heads/--heads-per-group/--ffn fix the shape")
        console.print(f"note: --ratio {asked:g} asked for {asked:.1%} and {removed:.1%} was removed: {why}; "
                      f"`mptool shapes MODEL --ratio {asked:g}` lists the shapes, a smaller --ffn-multiple gives "
                      "finer FFN steps")
