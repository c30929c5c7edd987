"""MaskPrune: uniform structured masks learned by a minimax (Lagrangian) optimisation.

The stateful part: hooks, optimisers, schedules, checkpoints. The maths lives in
:mod:`mptool.masks`. Per decoder layer ``l`` there are masks on KV groups ``zg[l, g]``, on query
heads inside each group ``zh[l, g, r]`` and on FFN channels ``zf[l, c]``; a head's effective
mask is ``zg * zh``. The problem solved is

    min_{z in [0,1], LoRA, s}  max_{y >= 0, mu >= 0}
        KD(teacher || student_z) + sum_{k,l} y_{k,l} (sum_i z_{k,l,i} - s_k) + mu (P(s) - B)

* the KD loss is KL at temperature T between the dense model (LoRA disabled, masks at 1: no
  second copy of the weights) and the masked model with LoRA; an LM loss can be added;
* masks take a gradient step on the KD loss (normalised by one running RMS shared by all mask
  types, so their relative importance survives), then the proximal step of the penalty
  (``z <- clip(z - lr * y, 0, 1)``);
* multipliers take projected dual-ascent steps, ``y <- max(0, y + rho * violation)``;
* targets ``s`` anneal from dense to final over the warm-up (none by default: the final targets
  from the first step). With ``--ratio`` the final legal shape is chosen under the parameter
  budget: by default (``snap_frac=0``) before the first step, by the KD loss of each legal
  candidate at the initial masks; with ``snap_frac=None`` and a warm-up (``warmup_frac > 0``) the
  targets are learned during the warm-up (value-per-parameter steps, projected onto the annealed
  budget) and fixed to a legal shape when it ends;
* from ``hard_frac`` of the steps on (0: from the start) the forward pass runs the hard
  top-``s_k`` mask of each layer (0/1 with ``forward="binary"``, times the mask values with
  ``"scaled"``), with straight-through gradients, so the trained structure is exactly the one kept.

Recovery can continue on this trainer (``continue_with`` + ``run_recovery``): the masks frozen at
the final structure, the same LoRA and AdamW state trained on at recovery's settings, resumable.

Finish: binarise top-k per layer, merge LoRA, fold the kept mask values into ``o_proj`` /
``down_proj`` columns (``"scaled"`` only), slice with :func:`mptool.surgery.materialize`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from mptool import distributed as D
from mptool import masks as M
from mptool.errors import MptoolError
from mptool.baselines import METHODS
from mptool.families import get_adapter
from mptool.hooks import apply_masks
from mptool.shapes import Dims, Target, continuous_params, prunable_params, snap
from mptool.surgery import LayerKeep

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
INITS = (*METHODS, "ones")
"""Mask initialisations: a one-shot score, or all ones."""


@dataclass
class MaskPruneConfig:
    """Knobs of mask learning (see docs/maskprune.md for what each does)."""

    steps: int = 60
    """Optimisation steps of mask learning."""
    max_tokens: int | None = None
    """Token budget: stop once this many training tokens were seen (None: steps decide)."""
    batch_size: int = 4
    lr_mask: float = 0.003
    """Step size of the masks (on the RMS-normalised KD gradient) and of the proximal shift.
    At the CPU budget every step size above 0 was worse than keeping the initial (one-shot)
    ranking, monotonically (50%: 0 / 0.003 / 0.01 / 0.03 gave 79.7 / 82.0 / 86.3 / 90.2 after
    recovery); 0.003 lets the masks refine the ranking near the top-k boundary (a few ranks per
    step) without the thrashing of larger steps. docs/maskprune.md has the table."""
    mask_norm: str = "shared"
    """What the mask gradient is divided by before the step. "shared": one running RMS over all
    masks (dominated by the FFN channels, so each type's relative importance survives, and a KV
    group, whose gradient sums over its heads, moves far per step). "per_type": a running RMS per
    unit type (KV groups, heads, FFN channels), so each type moves at the same pace in its own
    units; it stopped every KV-group swap and measured worse at 50% (63.32 against 59.53, one seed).
    docs/maskprune.md, "The KV groups' step", has the measurement."""
    lr_mask_schedule: str = "cosine"
    """The mask step over mask learning: decaying to 0 at the last step ("cosine", "linear") so
    that the last unit swaps (KV groups trade places until the end at a constant step) come early
    enough for LoRA to adapt to them, or "constant". The proximal shift decays with it. At 50%
    cosine measured 59.23 against the constant step's 60.70 (mean of three seeds), level at 20%
    (docs/maskprune.md, "The KV groups' step")."""
    mask_beta: float = 0.9
    """Momentum of the mask gradient (EMA, bias-corrected) before the step: averages the noise of
    small batches so that masks move on consistent evidence only. 0: the raw gradient."""
    lr_lora: float = 2e-3
    max_grad_norm: float | None = 1.0
    """LoRA gradients are scaled down to this global L2 norm before each AdamW step (None: never).
    A guard, as fine-tuning recipes have: without it, 128 steps of recovery at the constant rate
    diverged (docs/maskprune.md, "Gradient clipping")."""
    lora_r: int = 16
    lora_alpha: int = 32
    """LoRA of mask learning, the same rank as recovery's. Rank 8 (α 16, the default before) measured
    worse at 50% (78.34 against 77.10 after recovery, the same 32 k tokens) and equal at 20%
    (40.09 / 40.06): the first phase's adapter is part of the final model's capacity."""
    temperature: float = 1.0
    lm_weight: float = 1.0
    """Weight of the next-token loss added to the KD loss."""
    dual: str = "ascent"
    """Multiplier update. "ascent": projected dual ascent y <- max(0, y + rho * violation).
    "exact": dual ascent with exact line search, each step's multipliers are those at which the
    proximal step meets "kept = target" exactly (clamped at 0 like "ascent"); it tracks the target
    without the oscillation of "ascent" and measured level with it at the CPU budget (76.48 vs
    76.52 at 50%, docs/maskprune.md)."""
    rho: float = 2.0
    """Dual-ascent step of the per-layer multipliers (on the normalised violation; dual="ascent")."""
    fixed_multiplier: float | None = None
    """Ablation: hold every multiplier at this value instead of dual ascent."""
    lr_target: float = 0.05
    """Multiplicative step of the learned targets when --ratio is used (value-per-parameter
    reallocation between unit types, then projection onto the annealed budget)."""
    warmup_frac: float = 0.0
    """Fraction of steps over which the targets anneal from dense to final (units leave one by one
    while LoRA trains, the paper's schedule). 0 (default): the final targets from the first step.
    With the shape fixed before step 1 (snap_frac 0), 0.5 / 0.25 / 0 gave 77.10 / 76.94 / 74.99
    at 50% after recovery, and 40.14 / 39.57 / 39.81 at 20% (means of 3 seeds where 0.25 and 0;
    the same 32 k tokens; docs/maskprune.md): at 50% LoRA training on a structure that moves costs
    more than the anneal saves; at 20% the anneal helps a little (0.25 for light pruning)."""
    snap_frac: float | None = 0.0
    """With --ratio: fraction of steps after which the legal shape is fixed (None: at the end of
    the warm-up, the paper's joint target learning, which needs warmup_frac > 0). 0 (default) picks it before the first step,
    by the KD loss of each legal candidate with the initial (one-shot) masks, and every step then
    trains toward that one shape, as with explicit targets: measured better at 50% (two seeds,
    88.8 vs 115.9 mean perplexity after recovery) and equal at 20% (docs/maskprune.md)."""
    hard_frac: float = 0.0
    """Fraction of steps after which the forward pass uses the hard top-k masks (of the annealed
    counts). 0: hard from the start, so units leave one by one as the targets anneal."""
    forward: str = "binary"
    """Hard-phase forward: "binary" runs the exact 0/1 top-k structure (straight-through to the
    mask scores; nothing to fold); "scaled" runs top-k x mask value (values folded at the end)."""
    init: str = "flap"
    """Mask initialisation: a one-shot score ("flap", "wanda-sp", "magnitude": ranks mapped linearly
    to [0.5, 1] per layer) or "ones". The initial masks also pick the legal shape (snap_frac 0).
    "flap" measured better than "wanda-sp" at 50% (78.34 vs 81.80 after recovery, the same
    32 k tokens; flap's units also beat wanda-sp's under plain recovery, three seeds each)."""
    select: str = "learned"
    """Which units are kept at the final target: "learned" (the top-k of the learned masks, with
    the trained LoRA merged) or a one-shot score ("flap", "wanda-sp", "magnitude": MaskPrune
    decides the shape only; the units are that score's ranking of the dense weights at that shape,
    LoRA dropped; recovery then starts from there). Under earlier defaults a one-shot ranking
    measured better at the CPU budget; with today's (flap initialisation, shape fixed up front,
    mask step 0.003) the two are within the seed spread there (docs/maskprune.md)."""
    protect: float = 100.0
    """FFN channels whose largest write into the residual stream on the calibration text exceeds
    this multiple of their layer's median are always kept (the few that create and cancel
    massive activations, :func:`mptool.baselines.massive_channels`); 0: none. At 20% on SmolLM2
    the learned masks otherwise dropped layer 28's canceller (docs/maskprune.md)."""
    checkpoint_every: int = 20
    """Save a resumable checkpoint every N steps (0: never)."""
    kd_distill: bool = True
    """Ablation: False trains with the LM loss only (LoRA only, no teacher)."""
    bf16: bool = True
    """bf16 autocast for the forward/backward passes (masks, LoRA and optimiser stay fp32), where
    the device multiplies bf16 natively (``native_bf16``; fp32 elsewhere, the choice in report.json).
    Measured on this project's CPU (AVX512-BF16): forward 3.4x, forward+backward 2.3x faster."""
    kd_chunk: int | None = 2048
    """Tokens per chunk of the KD loss (each chunk checkpointed: its fp32 softmax temporaries live
    one chunk at a time; same value). None: all tokens at once."""
    grad_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (activation memory from every layer's tensors down to one hidden state per layer; about one
    more forward pass of time)."""


@dataclass
class MaskState:
    """Everything that changes during mask learning (what a checkpoint holds, with LoRA)."""

    zg: torch.Tensor
    zh: torch.Tensor
    zf: torch.Tensor
    yg: torch.Tensor
    yh: torch.Tensor
    yf: torch.Tensor
    ig: torch.Tensor  # running first-order importance |z * dL/dz| of each unit (loss units)
    ih: torch.Tensor
    if_: torch.Tensor
    mg: torch.Tensor  # momentum of the mask gradients
    mh: torch.Tensor
    mf: torch.Tensor
    s: list[float]  # continuous targets (kv_heads, heads_per_group, ffn)
    mu: float = 0.0
    grad_sq: float = 0.0
    grad_sq_type: list[float] | None = None  # running mean squares per unit type (mask_norm "per_type")
    step: int = 0
    tokens: int = 0
    snapped: list[int] | None = None  # the legal target once fixed
    snap_scores: dict[str, float] | None = None  # KD loss of each candidate target when it was fixed
    frozen_at: int | None = None  # the step at which mask learning ended and recovery began (continued LoRA)
    frozen_tokens: int = 0  # tokens seen by then

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("zg", "zh", "zf", "yg", "yh", "yf", "ig", "ih", "if_",
                                               "mg", "mh", "mf")}


def budgeted_steps(steps: int, max_tokens: int | None, tokens_per_step: int) -> int:
    """The steps a phase will run: ``steps``, or fewer where a token budget ends it first (the
    loop stops once ``max_tokens`` were seen, so after the ceil-th step)."""
    if max_tokens is None:
        return steps
    return min(steps, math.ceil(max_tokens / tokens_per_step))


LR_SCHEDULES = ("constant", "linear", "cosine")
MASK_NORMS = ("shared", "per_type")


def schedule_factor(schedule: str, step: int, total: int) -> float:
    """The fraction of the base rate at step ``step`` (0-based) of ``total``: 1 throughout
    ("constant"), or decaying toward 0 at the end ("linear", "cosine")."""
    frac = min(step / max(total, 1), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - frac
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")


def check_finite(loss: float, grads: list[torch.Tensor], where: str) -> None:
    """Refuse a step whose loss (averaged over ranks) or mask gradients are not finite, before
    anything is updated: one NaN would spread through the optimiser's and the masks' running
    averages and end in an arbitrary selection. The last checkpoint stays resumable."""
    bad = not math.isfinite(loss) or any(not bool(torch.isfinite(g.grad).all()) for g in grads if g.grad is not None)
    if bad:
        raise MptoolError(f"training diverged at {where}: the loss or its gradient is not finite (loss {loss}); "
                          "lower the learning rates (maskprune.lr_lora, lr_mask, recovery.lr) or turn bf16 off, "
                          "then resume from the last checkpoint")


@functools.lru_cache(maxsize=None)
def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` ("cpu", "cuda") multiplies bf16 matrices natively. A CPU without
    AVX512 (or AMX) falls back to PyTorch's reference kernels for bf16: measured on a 2-core AVX2
    AMD EPYC, a 1024 x 576 x 1536 product took 0.19-1.30 s in bf16 against 0.03 s in fp32, and a
    MaskPrune step 400-1,170 s against about 3.5 s on an AVX512 Xeon in bf16."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # private op: judge by the kernels' instruction set
            return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return True


def autocast(enabled: bool, device: torch.device | str = "cpu") -> Any:
    """bf16 autocast on ``device``'s type, cpu or cuda: a no-op context when disabled, and where
    the device has no native bf16 matrix products (``native_bf16``), where fp32 is many times faster."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=enabled and native_bf16(kind))


def enable_grad_checkpointing(model: Any) -> None:
    """transformers' per-decoder-layer activation checkpointing, non-reentrant (so frozen inputs,
    forward hooks and FSDP2 work), active in training mode only."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    logp_s = F.log_softmax(student.float() / t, dim=-1)
    logp_t = F.log_softmax(teacher.float() / t, dim=-1)
    return (logp_t.exp() * (logp_t - logp_s)).sum()


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
            chunk: int | None = None) -> torch.Tensor:
    """KL(teacher || student) per token at temperature T, scaled by T^2 (Hinton et al.).

    With ``chunk``, the tokens are taken ``chunk`` at a time, each under activation
    checkpointing: the fp32 log-softmaxes and products (about 8 tokens x vocabulary tensors)
    exist for one chunk at a time, forward and backward; the value is the same.
    """
    t = temperature
    s, te = student.flatten(0, -2), teacher.flatten(0, -2)
    n = s.shape[0]
    if chunk is None or chunk >= n:
        return _kl_sum(s, te, t) / n * t * t
    from torch.utils.checkpoint import checkpoint

    # split (one backward node that concatenates the chunk gradients), not slicing (one
    # full-size gradient per chunk)
    total = sum(checkpoint(_kl_sum, a, b, t, use_reentrant=False)
                for a, b in zip(s.split(chunk), te.split(chunk)))
    return total / n * t * t


def score_shapes(cands: list[Target], keep: Callable[[Target], None], student: Callable[[], torch.Tensor],
                 teacher: torch.Tensor, temperature: float, chunk: int | None = None,
                 alone: bool = False) -> dict[Target, float]:
    """The KD loss against ``teacher`` of the model with each candidate's units kept.

    ``keep(t)`` sets the masks to the units kept at target ``t``; ``student()`` runs the probe
    batch. Averaged over ranks, so that every rank fixes the same shape (``alone``: this process
    scores for all, no collective). The rule MaskPrune uses to fix its legal shape, and
    ``--split kd`` for one-shot methods.
    """
    scores = {}
    for t in cands:
        keep(t)
        loss = kd_loss(student(), teacher, temperature, chunk).item()
        scores[t] = loss if alone else D.mean(loss)
    return scores


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


class MaskPrune:
    """Mask learning on one model. ``run()`` trains; ``keeps()`` and ``finish()`` produce the result."""

    def __init__(self, model: Any, blocks: torch.Tensor, cfg: MaskPruneConfig, *,
                 target: Target | None = None, budget: float | None = None,
                 tp: tuple[int, ...] = (1,), ffn_multiple: int = 64,
                 init_scores: Any = None, seed: int = 0, sharding: str = "ddp",
                 device: torch.device | None = None, protected: torch.Tensor | None = None,
                 grams: tuple[Any, Any] | None = None, defer: bool = False) -> None:
        """Wrap ``model`` with LoRA and mask hooks.

        ``grams``: per layer, the input Gram matrices of ``o_proj`` and ``down_proj`` of the dense
        model on the calibration text (:func:`mptool.baselines.calibrate` with ``gram=True``);
        the hard structure then runs with the compensation they give (:mod:`mptool.compensate`:
        the kept columns of o_proj/down_proj also carry the dense model's linear prediction of the
        dropped units; the teacher, masks off, runs without it) and :meth:`finish` keeps it in the
        sliced weights. None: the plain cut.

        ``protected``: ``[layers, intermediate]`` bool, FFN channels kept whatever their mask
        (their mask stays 1 and they rank first in every top-k).
        Under ``sharding="fsdp"`` with several processes the LoRA model is sharded with FSDP2
        (weights may still be on the CPU: FSDP moves each shard to this process's device);
        otherwise it runs on the device its weights are on.

        ``defer``: ``init_scores``, ``protected`` and ``grams`` come later, through
        :meth:`start` (after :meth:`calibrate` on the wrapped model).
        """
        from peft import LoraConfig, get_peft_model

        if (target is None) == (budget is None):
            raise ValueError("give exactly one of target (fixed) or budget (learned targets)")
        self.cfg, self.blocks, self.seed = cfg, blocks, seed
        self.d = d = Dims.from_config(model.config)
        self.target, self.budget, self.tp, self.ffn_multiple = target, budget, tp, ffn_multiple
        self.dense_prunable = prunable_params(d, d.dense_target())
        adapter = get_adapter(model.config)
        torch.manual_seed(seed)
        for p in model.parameters():
            p.requires_grad_(False)
        names = [getattr(adapter, n) for n in LORA_TARGETS]
        self.lora_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                      target_modules=names)
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(model)
        self.model = get_peft_model(model, self.lora_config)
        if cfg.dual not in ("exact", "ascent"):
            raise ValueError(f"unknown multiplier update {cfg.dual!r}: exact or ascent")
        if cfg.forward not in ("binary", "scaled"):
            raise ValueError(f"unknown mask forward {cfg.forward!r}: binary or scaled")
        if cfg.lr_mask_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown mask step schedule {cfg.lr_mask_schedule!r}: one of {', '.join(LR_SCHEDULES)}")
        if cfg.mask_norm not in MASK_NORMS:
            raise ValueError(f"unknown mask gradient normalisation {cfg.mask_norm!r}: {' or '.join(MASK_NORMS)}")
        if cfg.init not in INITS:
            raise ValueError(f"unknown mask init {cfg.init!r}: one of {', '.join(INITS)}")
        self._masks_on = True
        # hard masks of the previous step and the churn between them (a diagnostic, not state:
        # the first step after a resume reports 0)
        self._prev_hard: tuple[torch.Tensor, torch.Tensor] | None = None
        self._churn = {"churn_heads": 0.0, "churn_ffn": 0.0}
        self.extra_files: dict[str, str] = {}
        """Text files written into every checkpoint (the caller's resolved config)."""
        self._heads: list[torch.Tensor] = []
        self._ffn: list[torch.Tensor] = []
        self.hooks = apply_masks(self.model.base_model.model, self._head_mask, self._ffn_mask)
        self.sharded = D.sharded(sharding)
        if self.sharded:
            D.fsdp_wrap(self.model, adapter.decoder_layers(self.model.base_model.model))
        self.device = device or (D.device() if self.sharded else next(model.parameters()).device)
        self.lora_params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.lora_params, lr=cfg.lr_lora, weight_decay=0.0)
        self.rec: Any = None
        """Recovery that continues this trainer's LoRA (``continue_with``), or None."""
        self.grams, self.comp = None, None
        if not defer:
            self.start(init_scores, protected, grams)

    def start(self, init_scores: Any = None, protected: torch.Tensor | None = None,
              grams: tuple[Any, Any] | None = None) -> None:
        """The initial masks (from ``init_scores`` unless ``init`` is "ones"), the protected FFN
        channels and the compensation (see :meth:`__init__`): given to the constructor, or here
        after :meth:`calibrate` when it was built with ``defer=True``."""
        cfg, d, target = self.cfg, self.d, self.target
        L, G, R, I = d.num_layers, d.num_kv_heads, d.heads_per_group, d.intermediate_size
        if cfg.init != "ones" and init_scores is not None:
            zg, zh, zf = (M.init_from_scores(init_scores.groups).cpu(), M.init_from_scores(init_scores.heads).cpu(),
                          M.init_from_scores(init_scores.ffn).cpu())
        else:
            zg, zh, zf = torch.ones(L, G), torch.ones(L, G, R), torch.ones(L, I)
        self.protected = (torch.zeros(L, I, dtype=torch.bool) if protected is None
                          else protected.to(device="cpu", dtype=torch.bool))
        zf = zf.masked_fill(self.protected, 1.0)
        final = target or d.dense_target()
        self.state = MaskState(zg=zg.clone(), zh=zh.clone(), zf=zf.clone(), yg=torch.zeros(L),
                               yh=torch.zeros(L, G), yf=torch.zeros(L),
                               ig=torch.zeros(L, G), ih=torch.zeros(L, G, R), if_=torch.zeros(L, I),
                               mg=torch.zeros(L, G), mh=torch.zeros(L, G, R), mf=torch.zeros(L, I),
                               s=[float(final.kv_heads), float(final.heads_per_group), float(final.ffn)],
                               snapped=[final.kv_heads, final.heads_per_group, final.ffn] if target else None)
        self.grams = grams
        if grams is not None:
            from mptool.compensate import Compensator
            from mptool.hooks import _projections

            self.comp = Compensator(_projections(self.model.base_model.model), grams, d.head_dim,
                                    weight=self._base_weight, gate=lambda: self._masks_on,
                                    device=self.device, frozen=self._frozen,
                                    owner=D.owner if D.world_size() > 1 else None)
            self.hooks.handles.extend(self.comp.handles)

    @contextlib.contextmanager
    def _evaluating(self, dense: bool) -> Iterator[None]:
        """The model in eval mode, as it stands (the masks as last set) or with ``dense`` as the
        teacher (adapters off, masks at 1: the dense model); restored afterwards."""
        masks_on, training = self._masks_on, self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter() if dense else contextlib.nullcontext():
                self._masks_on = masks_on and not dense
                yield
        finally:
            self._masks_on = masks_on
            self.model.train(training)

    @torch.no_grad()
    def calibrate(self, methods: tuple[str, ...], blocks: torch.Tensor, protect: float = 0.0,
                  gram: bool = False, batch_size: int = 4,
                  progress: Callable[[int], None] | None = None) -> tuple[dict[str, Any], torch.Tensor, Any]:
        """:func:`mptool.compress.one_shot_scores` on this trainer's model as the dense teacher,
        every process a share of the blocks on its device and the statistics summed over them:
        under FSDP the calibration runs where the shards are and no process needs the whole model.
        Returns (scores by method, protected FFN channels, Gram matrices or None), the same on
        every process. Call it before :meth:`start`."""
        from mptool.baselines import calibrate, needs_calibration, one_shot_results

        model = self.model.base_model.model
        o_stats = d_stats = None
        if needs_calibration(methods, protect, gram):
            with self._evaluating(dense=True):
                o_stats, d_stats = calibrate(model, blocks, batch_size, progress, gram, split=True, run=self.model,
                                             share_grams=True)
        return one_shot_results(model, methods, o_stats, d_stats, protect, gram)

    def perplexity(self, ids: torch.Tensor, protocol: Any, dense: bool = False,
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Held-out perplexity of this model as it stands (the masks as last set), or with
        ``dense`` of the teacher (adapters off, masks at 1: the dense model). Every process of a
        multi-process run calls it and runs a share of the windows, so a sharded model is evaluated
        where its shards are (:func:`mptool.evaluate.perplexity`)."""
        from mptool.evaluate import perplexity

        with self._evaluating(dense):
            return perplexity(self.model, ids, protocol, progress=progress, split=True)

    def _base_weight(self, layer: int, j: int) -> torch.Tensor:
        """The frozen dense weight of o_proj (j 0) / down_proj (j 1), under LoRA and FSDP too."""
        from mptool.hooks import _projections

        mod = _projections(self.model.base_model.model)[layer][j]
        w = mod.get_base_layer().weight if hasattr(mod, "get_base_layer") else mod.weight
        return w.full_tensor() if hasattr(w, "full_tensor") else w  # FSDP: every rank calls, same order

    def _frozen(self, layer: int, j: int) -> torch.Tensor | None:
        """Columns compensation leaves alone: the protected FFN channels (massive activations)."""
        from mptool.compensate import frozen_columns

        return frozen_columns(self.protected, layer, j)

    def _compensate(self, heads: torch.Tensor, ffn: torch.Tensor) -> None:
        """Run the hard structure (kept units nonzero) with its compensation, if any."""
        if self.comp is not None:
            self.comp.set(heads, ffn)

    # ------------------------------------------------------------------ masks in the forward

    def _head_mask(self, layer: int) -> torch.Tensor:
        return self._heads[layer] if self._masks_on else torch.ones(self.d.num_heads)

    def _ffn_mask(self, layer: int) -> torch.Tensor:
        return self._ffn[layer] if self._masks_on else torch.ones(self.d.intermediate_size)

    def current_targets(self) -> tuple[float, float, float]:
        """The per-layer targets at the current step (annealed from dense during the warm-up)."""
        d, st = self.d, self.state
        warm = self._warmup_steps()
        dense = (d.num_kv_heads, d.heads_per_group, d.intermediate_size)
        if st.snapped is None:  # learned targets already follow the annealed budget
            return tuple(st.s)  # type: ignore[return-value]
        return tuple(M.anneal(a, b, st.step, warm) for a, b in zip(dense, st.snapped))  # type: ignore[return-value]

    def hard_counts(self) -> tuple[int, int, int]:
        """Integer per-layer counts of the hard forward mask at this step (ceil of the targets)."""
        if self.state.snapped is not None and self.state.step >= self._warmup_steps():
            return tuple(self.state.snapped)  # type: ignore[return-value]
        return tuple(max(1, math.ceil(v - 1e-6)) for v in self.current_targets())  # type: ignore[return-value]

    def planned_steps(self) -> int:
        """The steps mask learning will run: ``cfg.steps``, or fewer where ``cfg.max_tokens`` ends
        it first. The warm-up, the snap and the hard forward are fractions of this, so a token
        budget still anneals to the final targets and trains at them."""
        cfg = self.cfg
        return budgeted_steps(cfg.steps, cfg.max_tokens, cfg.batch_size * self.blocks.shape[1])

    def _warmup_steps(self) -> int:
        """Steps of the anneal from dense to the final targets; 0 with ``warmup_frac`` 0 (the final
        targets from the first step), at least 1 otherwise."""
        if self.cfg.warmup_frac <= 0:
            return 0
        return max(1, int(self.cfg.warmup_frac * self.planned_steps()))

    def _snap_steps(self) -> int:
        if self.cfg.snap_frac is None:
            return self._warmup_steps()
        return min(int(self.cfg.snap_frac * self.planned_steps()), self._warmup_steps())

    def _snap_due(self) -> bool:
        st = self.state
        return self.budget is not None and st.snapped is None and st.step >= self._snap_steps()

    def _hard(self) -> bool:
        return self.state.step >= int(self.cfg.hard_frac * self.planned_steps())

    def _effective(self, zg: torch.Tensor, zh: torch.Tensor, zf: torch.Tensor) -> None:
        """Compute every layer's head and FFN mask for this step (soft, or hard straight-through)."""
        d = self.d
        if self._hard():
            kv, hpg, ffn = self.hard_counts()
            gmask, hmask = M.group_topk(zg.detach(), zh.detach(), kv, hpg)
            fmask = self._ffn_topk(zf.detach(), ffn)
            st_fn = M.straight_through_binary if self.cfg.forward == "binary" else M.straight_through
            g = st_fn(zg, gmask)
            # the heads' straight-through base ignores the group choice (the top heads of every
            # group): the forward is the same (a dropped group's gate is 0), and a dropped group's
            # gate receives the gradient of adding it back with its best heads — on hmask, which
            # is 0 there, it would get none and could never win its place back
            within = M.group_topk(zg.detach(), zh.detach(), d.num_kv_heads, hpg)[1]
            h = st_fn(zh, within)
            f = st_fn(zf, fmask)
            kept = ((hmask > 0).reshape(d.num_layers, d.num_heads), fmask > 0)
            prev = self._prev_hard or kept  # first hard step: nothing to compare with, churn 0
            self._churn = {"churn_heads": M.churn(prev[0], kept[0]), "churn_ffn": M.churn(prev[1], kept[1])}
            self._prev_hard = kept
            self._compensate(*kept)
        else:
            g, h, f = zg, zh, zf
            self._churn, self._prev_hard = {"churn_heads": 0.0, "churn_ffn": 0.0}, None
            if self.comp is not None:
                self.comp.on = False  # soft masks: every unit still runs, nothing to stand in for
        self._set_masks(g, h, f)

    def _ffn_topk(self, zf: torch.Tensor, k: int) -> torch.Tensor:
        """Top-k FFN channels of each layer by mask value, protected channels first."""
        return M.topk_mask(M.rank_first(zf, self.protected), k)

    def _set_masks(self, g: torch.Tensor, h: torch.Tensor, f: torch.Tensor) -> None:
        d = self.d
        heads = (g.unsqueeze(-1) * h).reshape(d.num_layers, d.num_heads)
        self._heads = list(heads.unbind(0))
        self._ffn = list(f.unbind(0))

    def final_target_counts(self) -> tuple[int, int, int]:
        st = self.state
        if st.snapped is None:
            self._snap()
        return tuple(st.snapped)  # type: ignore[return-value]

    def _snap(self) -> None:
        """Fix the legal target: the candidate within the budget whose masks distil best.

        Candidates are the legal targets within the budget with the widest FFN for each
        attention shape (:func:`mptool.shapes.candidates`). Each is scored by the KD loss, on a
        fixed probe batch, of the model with the current LoRA and the hard top-k of the
        learned masks at that shape; the lowest wins. The scores go into the metrics.
        """
        from mptool.shapes import candidates

        st, d = self.state, self.d
        ratio = 1.0 - self.budget / self.dense_prunable
        cands = candidates(d, min(max(ratio, 1e-9), 1 - 1e-9), self.tp, self.ffn_multiple)
        if not cands:
            snap(d, *st.s, budget=self.budget, tp=self.tp, ffn_multiple=self.ffn_multiple)  # raises
        probe = self.blocks[: self.cfg.batch_size].to(self.device)
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), autocast(self.cfg.bf16, self.device):
            self._masks_on = False
            with self.model.disable_adapter():
                teacher = self.model(probe).logits
            self._masks_on = True

            def keep(t: Target) -> None:
                self._set_kept(t.kv_heads, t.heads_per_group, t.ffn, scaled=self.cfg.forward == "scaled")

            scores = score_shapes(cands, keep, lambda: self.model(probe).logits, teacher,
                                  self.cfg.temperature, self.cfg.kd_chunk)
        self.model.train(was_training)
        best = min(scores, key=scores.get)
        st.snapped = [best.kv_heads, best.heads_per_group, best.ffn]
        st.snap_scores = {str(t): round(v, 4) for t, v in sorted(scores.items(), key=lambda kv: kv[1])}

    # ------------------------------------------------------------------ one step

    def _batch(self) -> torch.Tensor:
        n, bs, st = len(self.blocks), self.cfg.batch_size, self.state
        if st.frozen_at is None:
            start = st.step * bs
        else:  # recovery continues on the blocks after those mask learning consumed
            bs = self.rec.batch_size
            start = st.frozen_at * self.cfg.batch_size + (st.step - st.frozen_at) * bs
        idx = [(start + i) % n for i in range(bs)]
        return self.blocks[idx]

    def step(self) -> dict[str, float]:
        cfg, st = self.cfg, self.state
        if st.frozen_at is not None:
            return self._recovery_step()
        if self._snap_due():  # snap_frac 0: the shape is fixed before the first step
            self._snap()
        global_ids = self._batch()
        ids = D.shard(global_ids).to(self.device)
        zg, zh, zf = (st.zg.clone().requires_grad_(True), st.zh.clone().requires_grad_(True),
                      st.zf.clone().requires_grad_(True))
        self._effective(zg, zh, zf)
        loss, kd, lm, grad_norm = self._lora_step(ids, cfg.kd_distill, cfg.bf16, cfg.temperature, cfg.lm_weight,
                                                  cfg.kd_chunk, cfg.max_grad_norm, masks=(zg, zh, zf))

        with torch.no_grad():
            grads = [zg.grad, zh.grad, zf.grad]
            beta = 0.0 if st.step == 0 else 0.9
            st.ig = beta * st.ig + (1 - beta) * (zg * zg.grad).abs()
            st.ih = beta * st.ih + (1 - beta) * (zh * zh.grad).abs()
            st.if_ = beta * st.if_ + (1 - beta) * (zf * zf.grad).abs()
            sq = sum(float((g * g).sum()) for g in grads) / sum(g.numel() for g in grads)
            st.grad_sq = sq if st.step == 0 else 0.9 * st.grad_sq + 0.1 * sq
            sq_type = [float((g * g).mean()) for g in grads]
            st.grad_sq_type = (sq_type if st.step == 0 or st.grad_sq_type is None
                               else [0.9 * a + 0.1 * b for a, b in zip(st.grad_sq_type, sq_type)])
            if cfg.mask_norm == "per_type":
                rg, rh, rf = (math.sqrt(v) + 1e-12 for v in st.grad_sq_type)
            else:
                rg = rh = rf = math.sqrt(st.grad_sq) + 1e-12
            s_kv, s_h, s_f = self.current_targets()
            lr = cfg.lr_mask * schedule_factor(cfg.lr_mask_schedule, st.step, self.planned_steps())
            b = cfg.mask_beta
            st.mg, st.mh, st.mf = (b * st.mg + (1 - b) * zg.grad, b * st.mh + (1 - b) * zh.grad,
                                   b * st.mf + (1 - b) * zf.grad)
            unbias = 1.0 - b ** (st.step + 1)
            # masks after the gradient step, before the proximal step of the penalty
            pg, ph, pf = (z - lr * m / (unbias * r)
                          for z, m, r in ((st.zg, st.mg, rg), (st.zh, st.mh, rh), (st.zf, st.mf, rf)))
            if cfg.fixed_multiplier is None and cfg.dual == "exact" and lr > 0:
                st.yg, st.yh, st.yf = (M.exact_multiplier(pg, s_kv, lr), M.exact_multiplier(ph, s_h, lr),
                                       M.exact_multiplier(pf, s_f, lr))
            y = self._multipliers()
            st.zg = M.proximal_step(pg, lr, y["g"].unsqueeze(-1))
            st.zh = M.proximal_step(ph, lr, y["h"].unsqueeze(-1))
            st.zf = M.proximal_step(pf, lr, y["f"].unsqueeze(-1)).masked_fill(self.protected.to(pf.device), 1.0)
            vg, vh, vf = (M.violation(st.zg, s_kv), M.violation(st.zh, s_h), M.violation(st.zf, s_f))
            if cfg.fixed_multiplier is None and cfg.dual == "ascent":
                st.yg = M.dual_update(st.yg, vg, cfg.rho)
                st.yh = M.dual_update(st.yh, vh, cfg.rho)
                st.yf = M.dual_update(st.yf, vf, cfg.rho)
            if self.budget is not None and st.snapped is None:
                self._target_step()
        st.step += 1
        st.tokens += global_ids.numel()
        if self._snap_due():
            self._snap()
        hard_v = self._hard_violation()
        return {
            "step": st.step, "tokens": st.tokens, "loss": loss, "kd": D.mean(kd.item()), "lm": D.mean(lm.item()),
            "grad_norm": grad_norm,
            "viol_kv": float(vg.clamp_min(0).max()), "viol_heads": float(vh.clamp_min(0).max()),
            "viol_ffn": float(vf.clamp_min(0).max()), "hard_violation": hard_v,
            "y_kv": float(st.yg.mean()), "y_heads": float(st.yh.mean()), "y_ffn": float(st.yf.mean()),
            "y_max": float(max(st.yg.max(), st.yh.max(), st.yf.max())), "mu": st.mu,
            "s_kv": s_kv, "s_heads": s_h, "s_ffn": s_f,
            "binarity": M.binarity(torch.cat([st.zg.flatten(), st.zh.flatten(), st.zf.flatten()])),
            # running RMS of each type's mask gradient, relative to the one over all masks
            **{f"grad_rms_{k}": math.sqrt(v / st.grad_sq) if st.grad_sq > 0 else 0.0
               for k, v in zip(("kv", "heads", "ffn"), st.grad_sq_type or (0.0, 0.0, 0.0))},
            **self._churn,
            "hard": self._hard(),
        }

    def _lora_step(self, ids: torch.Tensor, distil: bool, bf16: bool, temperature: float, lm_weight: float,
                   chunk: int | None, max_norm: float | None,
                   masks: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, ...]:
        """Teacher logits (adapters off, masks at 1) when ``distil``, the student with the masks set
        for this step, KD (+ LM) loss, backward, gradients averaged over ranks (LoRA's unless FSDP
        did it, and ``masks``), LoRA's clipped to ``max_norm``, one AdamW step. Returns (loss
        averaged over ranks, kd, lm, the LoRA gradient norm before clipping)."""
        teacher = None
        if distil:
            self._masks_on = False
            with torch.no_grad(), self.model.disable_adapter(), autocast(bf16, self.device):
                teacher = self.model(ids).logits
            self._masks_on = True
        with autocast(bf16, self.device):
            logits = self.model(ids).logits
        kd = kd_loss(logits, teacher, temperature, chunk) if teacher is not None else torch.zeros(())
        lm = lm_loss(logits, ids) if (lm_weight or teacher is None) else torch.zeros(())
        loss = kd + (lm_weight if teacher is not None else 1.0) * lm
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        # FSDP's reduce-scatter has already averaged the LoRA gradients; the masks are ours
        grads = [*masks] if self.sharded else [*self.lora_params, *masks]
        if grads:
            D.average_grads(grads)
        mean_loss = D.mean(loss.item())
        check_finite(mean_loss, [*masks], f"step {self.state.step + 1}")
        grad_norm = D.clip_grads(self.lora_params, max_norm)
        self.opt.step()
        return mean_loss, kd, lm, grad_norm

    def _multipliers(self) -> dict[str, torch.Tensor]:
        st, fixed = self.state, self.cfg.fixed_multiplier
        if fixed is None:
            return {"g": st.yg, "h": st.yh, "f": st.yf}
        return {"g": torch.full_like(st.yg, fixed), "h": torch.full_like(st.yh, fixed),
                "f": torch.full_like(st.yf, fixed)}

    def _target_step(self) -> None:
        """Move the continuous targets toward the unit type with the highest value per parameter.

        The value of one more unit of a type is the learned first-order importance
        ``|z * dKD/dz|`` (in loss units, so comparable across types) of the marginal unit,
        the one ranked ``s_k`` in its layer; divided by the unit's parameter cost it is a value
        per parameter. Targets grow where that value is above the parameter-weighted mean and
        shrink where it is below, then are projected back onto the (annealed) budget
        ``P(s) = B``: the budget multiplier is enforced exactly by the projection, and ``mu``
        is reported as the implied price (the weighted mean value per parameter).
        """
        d, st, cfg = self.d, self.state, self.cfg
        kv, hpg, ffn = st.s
        head = 2 * d.hidden_size * d.head_dim
        cost = [head * (1 + hpg), head * kv, 3 * d.hidden_size]  # dP/ds_k per layer
        value = [_marginal(st.ig, kv), _marginal(st.ih.flatten(1), kv * hpg) * kv, _marginal(st.if_, ffn)]
        per_param = [v / c for v, c in zip(value, cost)]
        share = [c * s_k for c, s_k in zip(cost, st.s)]
        mean = sum(p * w for p, w in zip(per_param, share)) / sum(share)
        st.mu = mean
        s_new = list(st.s)
        if mean > 0:
            s_new = [s_k * math.exp(cfg.lr_target * max(-3.0, min(3.0, p / mean - 1.0)))
                     for s_k, p in zip(st.s, per_param)]
        budget_now = M.anneal(self.dense_prunable, self.budget, st.step + 1, self._warmup_steps())
        st.s = self._project(s_new, budget_now)

    def _project(self, s: list[float], budget: float) -> list[float]:
        """Scale all targets by one factor (clipped to [1, dense]) so that P(s) = budget."""
        d = self.d
        dense = (d.num_kv_heads, d.heads_per_group, d.intermediate_size)

        def at(alpha: float) -> list[float]:
            return [min(float(n), max(1.0, v * alpha)) for v, n in zip(s, dense)]

        lo, hi = 0.0, 1.0
        while continuous_params(d, *at(hi)) < budget and hi < 1e6:
            hi *= 2
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if continuous_params(d, *at(mid)) < budget else (lo, mid)
        return at(lo)

    def _hard_violation(self) -> float:
        """Max over layers of |units kept by the hard top-k - target| / units (0 once uniform)."""
        if self.state.snapped is None:
            return float("nan")
        keeps = self.keeps()
        kv, hpg, ffn = self.state.snapped
        worst = 0.0
        for k in keeps:
            worst = max(worst, abs(len(k.kv_groups) - kv) / self.d.num_kv_heads,
                        abs(len(k.ffn) - ffn) / self.d.intermediate_size,
                        max((abs(len(h) - hpg) for h in k.heads), default=0) / self.d.heads_per_group)
        return worst

    # ------------------------------------------------------------------ results

    def keeps(self) -> list[LayerKeep]:
        """Binarise: per layer, the top units by mask value, exactly the target everywhere."""
        kv, hpg, ffn = self.final_target_counts()
        gmask, hmask = M.group_topk(self.state.zg, self.state.zh, kv, hpg)
        fmask = self._ffn_topk(self.state.zf, ffn)
        out = []
        for layer in range(self.d.num_layers):
            groups = M.mask_indices(gmask[layer])
            out.append(LayerKeep(groups, [M.mask_indices(hmask[layer, g]) for g in groups],
                                 M.mask_indices(fmask[layer])))
        return out

    def finish(self, reload: Callable[[], Any] | None = None) -> tuple[Any, list[LayerKeep]]:
        """Merge LoRA, fold the kept mask values into o_proj/down_proj, slice. Returns (model, keeps).

        The sliced model is on the CPU. A sharded trainer holds only a shard of the weights, so it
        needs ``reload()`` (a fresh dense model: the base weights are frozen, so this is exact)
        and merges the gathered LoRA into that; every rank gets the same plain model, except a rank
        whose ``reload()`` gives a meta-device skeleton (rank 0 alone loads weights), which gets the
        sliced skeleton: recovery's FSDP wrap fills it from rank 0.
        """
        from mptool.surgery import materialize

        from mptool.hooks import _projections

        keeps = self.keeps()
        deltas = self._final_deltas()
        self.hooks.remove()
        if self.sharded:
            if reload is None:
                raise ValueError("a sharded trainer needs reload() to rebuild the dense weights")
            plain = reload()
            empty = D.on_meta(plain)  # this rank loaded no weights (rank 0 did): the sliced skeleton only
            self.model = D.unsharded_lora(self.model, plain if empty else plain.cpu(), self.lora_config)
            if empty:
                return materialize(self.model.unload(), keeps), keeps
        base = self.model.merge_and_unload().cpu()
        projections = _projections(base)
        with torch.no_grad():
            for layer, j in list(deltas):  # each moved to the host as it is added, then freed
                cols, dw = deltas.pop((layer, j))
                w = projections[layer][j].weight
                w[:, cols.to(w.device)] += dw.to(w.device, w.dtype)
        if self._scaled():  # the binary forward ran kept units at scale 1
            self._fold(base)
        for p in base.parameters():
            p.requires_grad_(False)
        return materialize(base, keeps, consume=True), keeps  # base is ours: no second copy

    def _final_deltas(self) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
        """The compensation of the final structure (the units :meth:`keeps` keeps), per (layer,
        projection): (columns, delta) where the compensator keeps them (the training device),
        taken out of it; the compensator's cached deltas wherever the last forward already ran
        that structure."""
        if self.comp is None:
            return {}
        self._set_final_masks()
        out = {key: (cols, dw) for key, (_, cols, dw) in self.comp.entries.items() if dw is not None}
        self.comp.clear()  # the caller holds the only copies: freed as it uses them
        return out

    def _fold(self, base: Any) -> None:
        """Multiply the mask values into the ``o_proj`` / ``down_proj`` input columns."""
        d, st = self.d, self.state
        adapter = get_adapter(base.config)
        heads = (st.zg.unsqueeze(-1) * st.zh).reshape(d.num_layers, d.num_heads)
        with torch.no_grad():
            for layer, mod in enumerate(adapter.decoder_layers(base)):
                o = getattr(adapter.attention(mod), adapter.o)
                o.weight.mul_(heads[layer].repeat_interleave(d.head_dim).to(o.weight.dtype))
                down = getattr(adapter.ffn(mod), adapter.down)
                down.weight.mul_(st.zf[layer].to(down.weight.dtype))

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, folder: Path) -> None:
        """Masks, multipliers, targets, LoRA weights, optimiser and RNG states; written atomically."""
        from safetensors.torch import save_file

        from mptool.io import atomic_dir

        st = self.state
        lora = D.full_trainable(self.model)  # collectives: every rank takes part
        opt = D.full_optimizer_state(self.model, self.opt)
        if not D.is_main():
            D.barrier()
            return
        with atomic_dir(folder) as tmp:
            tensors = {f"mask.{k}": v.contiguous() for k, v in st.tensors().items()}
            tensors.update({f"lora.{k}": v.contiguous() for k, v in lora.items()})
            tensors["protected"] = self.protected.contiguous()
            save_file(tensors, str(tmp / "state.safetensors"))
            opt_tensors, opt_meta = {}, {"param_groups": opt["param_groups"], "state": {}}
            for name, s in opt["state"].items():
                opt_meta["state"][name] = {}
                for key, val in s.items():
                    if torch.is_tensor(val):
                        opt_tensors[f"{name}::{key}"] = val.detach().cpu().contiguous()
                    else:
                        opt_meta["state"][name][key] = val
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            scalars = {k: v for k, v in asdict(st).items() if k not in st.tensors()}
            rng = {"python": _jsonable_rng(random.getstate()), "torch": torch.get_rng_state().tolist(),
                   "cuda": ([t.tolist() for t in torch.cuda.get_rng_state_all()]
                            if torch.cuda.is_available() else None)}
            for name, text in self.extra_files.items():
                (tmp / name).write_text(text)
            (tmp / "trainer.json").write_text(json.dumps(
                {"state": scalars, "optimizer": opt_meta, "rng": rng, "config": asdict(self.cfg)}))
        D.barrier()

    def load_checkpoint(self, folder: Path) -> None:
        """Restore a :meth:`save_checkpoint` folder (check it first with :func:`check_checkpoint`).

        Raises:
            MptoolError: the checkpoint was written for another model or shape.
        """
        from safetensors.torch import load_file

        data = load_file(str(folder / "state.safetensors"))
        meta = json.loads((folder / "trainer.json").read_text())
        st = self.state
        for key, now in st.tensors().items():
            saved = data.get(f"mask.{key}")
            if saved is None or saved.shape != now.shape:
                got = "none" if saved is None else tuple(saved.shape)
                raise MptoolError(f"checkpoint {folder} was written for another model: its {key} masks have shape "
                                  f"{got}, this model's {tuple(now.shape)}; resume it with the model it was made from")
        for key in st.tensors():
            setattr(st, key, data[f"mask.{key}"].clone())
        # the channels protected when the run began (a resume on another device could compute a
        # borderline set differently); a checkpoint from before protection had none
        self.protected = data.get("protected", torch.zeros_like(self.protected)).bool().clone()
        for key, val in meta["state"].items():
            setattr(st, key, val)
        state: dict[str, dict] = {name: dict(extra) for name, extra in meta["optimizer"]["state"].items()}
        for key, val in load_file(str(folder / "optimizer.safetensors")).items():
            name, field_ = key.rsplit("::", 1)
            state.setdefault(name, {})[field_] = val
        try:
            D.load_full_state(self.model, self.opt, {k[5:]: v for k, v in data.items() if k.startswith("lora.")},
                              {"state": state, "param_groups": meta["optimizer"]["param_groups"]})
        except (RuntimeError, KeyError, ValueError) as e:
            from mptool.models import _one_line

            raise MptoolError(f"checkpoint {folder} does not fit this model's LoRA adapters and optimiser "
                              f"({_one_line(e)}); resume it with the model and recipe it was made with") from None
        random.setstate(_tuple_rng(meta["rng"]["python"]))
        torch.set_rng_state(torch.tensor(meta["rng"]["torch"], dtype=torch.uint8))
        cuda = meta["rng"].get("cuda")  # absent before it was saved, None from a run without CUDA
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.tensor(t, dtype=torch.uint8) for t in cuda])
        if self.comp is not None:
            self.comp.clear()  # recomputed from the restored masks at the next forward

    # ------------------------------------------------------------------ loop

    def run(self, metrics_path: Path | None = None, checkpoint_dir: Path | None = None,
            progress: Callable[..., None] | None = None,
            stop_after: int | None = None) -> list[dict[str, float]]:
        """Train until ``cfg.steps`` (or the token budget); checkpoint every ``checkpoint_every``.

        ``stop_after`` ends the loop early at that step (tests use it to simulate a kill).
        """
        cfg, st = self.cfg, self.state

        def more() -> bool:
            return (st.frozen_at is None and st.step < cfg.steps
                    and (cfg.max_tokens is None or st.tokens < cfg.max_tokens))

        def info(row: dict) -> str:
            return (f"kd {row['kd']:.3f} viol {max(row['viol_kv'], row['viol_heads'], row['viol_ffn']):.3f} "
                    f"s=({row['s_kv']:.2f},{row['s_heads']:.2f},{row['s_ffn']:.0f}) "
                    f"bin {row['binarity']:.2f} churn {row['churn_ffn']:.3f}")

        return self._loop(more, info, metrics_path, checkpoint_dir, progress, stop_after)

    def run_recovery(self, metrics_path: Path | None = None, checkpoint_dir: Path | None = None,
                     progress: Callable[..., None] | None = None,
                     stop_after: int | None = None) -> list[dict[str, float]]:
        """Recovery without a cut: the masks frozen at the final uniform structure (the exact
        units and shape that will be kept), mask learning's LoRA and AdamW state trained on, on the
        blocks after those mask learning consumed. Needs ``continue_with``; call after ``run()``.
        ``finish()`` then merges and slices once. Resumable like mask learning.
        """
        st, rec = self.state, self.rec
        if rec is None:
            raise ValueError("continue_with(recovery config) first")
        self.freeze()

        def more() -> bool:
            done = st.step - st.frozen_at
            return done < rec.steps and (rec.max_tokens is None or st.tokens - st.frozen_tokens < rec.max_tokens)

        return self._loop(more, lambda row: f"loss {row['loss']:.4f}", metrics_path, checkpoint_dir, progress,
                          stop_after)

    def _loop(self, more: Callable[[], bool], info: Callable[[dict], str], metrics_path: Path | None,
              checkpoint_dir: Path | None, progress: Callable[..., None] | None,
              stop_after: int | None) -> list[dict[str, float]]:
        cfg, st = self.cfg, self.state
        history = []
        self.model.train()
        while more():
            t0 = time.perf_counter()
            row = self.step()
            row["step_s"] = round(time.perf_counter() - t0, 3)
            history.append(row)
            if metrics_path is not None and D.is_main():
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            if progress:
                progress(1, info=info(row))
            if checkpoint_dir is not None and cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0:
                self.save_checkpoint(checkpoint_dir)
            if stop_after is not None and st.step >= stop_after:
                break
        self.model.eval()
        return history

    # ------------------------------------------------------------------ recovery on the same adapter

    def continue_with(self, rec: Any) -> None:
        """Plan recovery as a continuation of this trainer (``run_recovery``): ``rec`` is a
        :class:`mptool.recover.RecoveryConfig`; its steps, token budget, batch size, lr,
        temperature, LM weight and ``kd`` apply, the adapter (rank) stays mask learning's and the
        teacher is this model with adapters disabled and masks at 1 (``rec.teacher`` is unused)."""
        self.rec = rec

    def freeze(self) -> None:
        """End mask learning: fix the final hard masks (no further mask, multiplier or target
        updates) and switch the LoRA optimiser to recovery's learning rate. Idempotent."""
        st = self.state
        if st.frozen_at is None:
            self.final_target_counts()
            st.frozen_at, st.frozen_tokens = st.step, st.tokens
            if self.rec is not None:
                for group in self.opt.param_groups:
                    group["lr"] = self.rec.lr
        self._set_final_masks()

    def _set_final_masks(self) -> None:
        self._set_kept(*self.final_target_counts(), scaled=self._scaled())

    def _set_kept(self, kv: int, hpg: int, ffn: int, scaled: bool) -> None:
        """Forward masks that keep the top units at these counts (at their mask value if ``scaled``)."""
        st = self.state
        gmask, hmask = M.group_topk(st.zg, st.zh, kv, hpg)
        fmask = self._ffn_topk(st.zf, ffn)
        if scaled:
            self._set_masks(gmask * st.zg, (hmask > 0).float() * st.zh, fmask * st.zf)
        else:
            self._set_masks(gmask, (hmask > 0).float(), fmask)
        self._compensate((gmask.unsqueeze(-1) * (hmask > 0)).reshape(self.d.num_layers, -1), fmask)

    def _scaled(self) -> bool:
        """Whether kept units run at their mask value (folded into the weights at the end): with
        the scaled forward, or when every step taken ran soft (``hard_frac`` > 0 and the run ended
        at or before the first hard step, ``hard_frac`` 1 included)."""
        end = self.state.step if self.state.frozen_at is None else self.state.frozen_at
        first_hard = int(self.cfg.hard_frac * self.planned_steps())
        return self.cfg.forward == "scaled" or 0 < first_hard >= end

    def _recovery_step(self) -> dict[str, float]:
        """One LoRA + KD step on the frozen structure (no mask, multiplier or target update)."""
        rec, st = self.rec, self.state
        global_ids = self._batch()
        ids = D.shard(global_ids).to(self.device)
        self._set_final_masks()
        from mptool.recover import scheduled_lr

        for group in self.opt.param_groups:
            group["lr"] = scheduled_lr(rec, st.step - st.frozen_at, global_ids.shape[1])
        loss, kd, lm, grad_norm = self._lora_step(ids, rec.kd, rec.bf16, rec.temperature, rec.lm_weight,
                                                  rec.kd_chunk, rec.max_grad_norm)
        st.step += 1
        st.tokens += global_ids.numel()
        return {"phase": "recovery", "step": st.step - st.frozen_at, "tokens": st.tokens - st.frozen_tokens,
                "loss": loss, "kd": D.mean(kd.item()), "lm": D.mean(lm.item()), "grad_norm": grad_norm}


def _marginal(importance: torch.Tensor, s: float) -> float:
    """Mean over layers of the importance of the unit ranked ``s`` (the marginal one)."""
    ranked = importance.sort(-1, descending=True).values
    k = min(ranked.shape[-1] - 1, max(0, int(math.ceil(s)) - 1))
    return float(ranked[..., k].mean())


def _jsonable_rng(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _tuple_rng(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


CHECKPOINT_FILES = ("compress-config.yaml", "trainer.json", "state.safetensors", "optimizer.safetensors")


def check_checkpoint(folder: Path) -> dict[str, Any]:
    """Read a MaskPrune checkpoint folder's files without loading a model; returns its recorded
    compress config (a mapping).

    Raises:
        MptoolError: a file missing, unreadable or of the wrong kind, named in one line.
    """
    import yaml
    from safetensors import safe_open

    from mptool.models import _one_line

    hint = "give the <out>.ckpt folder of an interrupted run, as it was written"
    if not folder.is_dir():
        raise MptoolError(f"--resume {folder} is not a folder; {hint}")
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise MptoolError(f"--resume {folder} is not a complete mptool checkpoint (no {', '.join(missing)}); {hint}")
    try:
        config = yaml.safe_load((folder / "compress-config.yaml").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        config = None
    if not isinstance(config, dict):
        raise MptoolError(f"--resume {folder}: compress-config.yaml is not a YAML mapping of compress settings; {hint}")
    try:
        meta = json.loads((folder / "trainer.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if not (isinstance(meta, dict) and all(isinstance(meta.get(k), dict) for k in ("state", "optimizer", "rng"))):
        raise MptoolError(f"--resume {folder}: trainer.json is not the JSON a mptool checkpoint writes; {hint}")
    for name in ("state.safetensors", "optimizer.safetensors"):
        try:
            with safe_open(str(folder / name), framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise MptoolError(f"--resume {folder}: {name} is not a readable safetensors file "
                              f"({_one_line(e)}); {hint}") from None
        if name == "state.safetensors" and not any(k.startswith("mask.") for k in keys):
            raise MptoolError(f"--resume {folder}: state.safetensors holds no masks; {hint}")
    return config
