"""Pure tensor maths of uniform masks: top-k binarisation, proximal and dual steps, sizes.

No state and no hooks: every function takes tensors (or numbers) and returns new ones, so each is
unit-tested on its own. Shapes: per-layer masks are stacked as ``[num_layers, units]``.
"""

from __future__ import annotations

import torch


def rank_first(scores: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """``scores`` with the units where ``first`` (bool, same shape) is set ranked above all others."""
    return scores.masked_fill(first.to(scores.device), float("inf"))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Binary mask keeping the ``k`` largest entries of each row (exactly ``k``; among tied
    scores ``torch.topk`` chooses, deterministically on the CPU).

    Args:
        scores: ``[rows, units]`` scores.
        k: kept per row, the same for every row (that is what makes the result uniform).
    """
    if not 0 <= k <= scores.shape[-1]:
        raise ValueError(f"k={k} outside [0, {scores.shape[-1]}]")
    out = torch.zeros_like(scores, dtype=torch.float32)
    if k:
        idx = torch.topk(scores.float(), k, dim=-1, sorted=False).indices
        out.scatter_(-1, idx, 1.0)
    return out


def group_topk(group_scores: torch.Tensor, head_scores: torch.Tensor, kv_keep: int,
               heads_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform GQA selection: top ``kv_keep`` groups per layer, top ``heads_keep`` heads in each.

    Args:
        group_scores: ``[layers, G]``.
        head_scores: ``[layers, G, R]`` scores of the query heads inside each group.
    Returns:
        ``(group_mask [layers, G], head_mask [layers, G, R])``; the head mask is zero in dropped
        groups, so ``head_mask.sum((1, 2)) == kv_keep * heads_keep`` in every layer.
    """
    layers, groups, per = head_scores.shape
    gmask = topk_mask(group_scores, kv_keep)
    hmask = topk_mask(head_scores.reshape(layers * groups, per), heads_keep).reshape(layers, groups, per)
    return gmask, hmask * gmask.unsqueeze(-1)


def mask_indices(mask: torch.Tensor) -> list[int]:
    """Ascending indices where a 1-D binary mask is set."""
    return torch.nonzero(mask > 0.5).flatten().tolist()


def proximal_step(z: torch.Tensor, step: torch.Tensor | float, y: torch.Tensor | float) -> torch.Tensor:
    """Proximal operator of the penalty ``y * sum(z)`` on the box ``[0, 1]``.

    For ``y >= 0`` the penalty is linear on the box, so its prox is a shift by ``step * y``
    followed by clipping: a soft threshold that drives the least supported units to exactly 0.
    ``y`` broadcasts against ``z`` (one multiplier per layer: shape ``[layers, 1]``).
    """
    return (z - step * y).clamp(0.0, 1.0)


def dual_update(y: torch.Tensor, violation: torch.Tensor, rho: float) -> torch.Tensor:
    """Projected dual ascent ``y <- max(0, y + rho * violation)``."""
    return (y + rho * violation).clamp_min(0.0)


def exact_multiplier(z: torch.Tensor, target: torch.Tensor | float, step: float,
                     iters: int = 40) -> torch.Tensor:
    """The multiplier ``y >= 0`` per row that makes the proximal step meet ``sum z <= target``
    exactly: the exact line search of projected dual ascent.

    ``sum(clip(z - step * y, 0, 1))`` falls monotonically in ``y``; bisection finds the ``y`` at
    which it equals ``target``, clamped at 0 like :func:`dual_update` (a row already at or below
    its target is left alone: a negative multiplier would lift every mask, and at the dense
    target of the first annealing step it would set them all to 1, erasing the initialisation).
    Where ``y > 0`` the prox with it is the Euclidean projection of ``z`` onto
    ``{0 <= z <= 1, sum z = target}``.
    """
    target = torch.as_tensor(target, dtype=z.dtype).expand(z.shape[:-1])
    lo = (z.min(-1).values - 1.0) / step  # shift such that every mask clips at 1
    hi = z.max(-1).values / step  # every mask clips at 0
    for _ in range(iters):
        mid = (lo + hi) / 2
        kept = (z - step * mid.unsqueeze(-1)).clamp(0.0, 1.0).sum(-1)
        too_many = kept > target
        lo, hi = torch.where(too_many, mid, lo), torch.where(too_many, hi, mid)
    return ((lo + hi) / 2).clamp_min(0.0)


def violation(z: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
    """Normalised constraint violation per row: ``(sum(z) - s) / units`` (positive: too many kept)."""
    return (z.sum(-1) - target) / z.shape[-1]


def anneal(dense: float, final: float, step: int, warmup: int) -> float:
    """Linear schedule of a target from the dense size to ``final`` over ``warmup`` steps, then hold."""
    if warmup <= 0:
        return final
    frac = min(1.0, max(0.0, step / warmup))
    return dense + (final - dense) * frac


def straight_through(soft: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """Forward ``hard * soft`` (only kept units, at their learned scale); backward as ``soft``.

    Units outside the top-k still get gradients, so they can win their place back.
    """
    return soft + (hard * soft - soft).detach()


def straight_through_binary(soft: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """Forward the binary ``hard`` mask exactly; backward as if the mask were ``soft``.

    The pruned structure is what runs (no unit is rescaled), and every unit's score still
    receives the gradient of adding or removing it.
    """
    return hard + (soft - soft.detach())


def churn(before: torch.Tensor, after: torch.Tensor) -> float:
    """Fraction of the units kept in ``after`` that were not kept in ``before`` (boolean masks).

    Units that only leave (a shrinking top-k over fixed scores) give 0; every swap across the
    top-k boundary counts once.
    """
    kept = after.sum()
    return float((after & ~before).sum() / kept) if kept else 0.0


def binarity(z: torch.Tensor, low: float = 0.05, high: float = 0.95) -> float:
    """Fraction of mask values strictly between ``low`` and ``high`` (0: fully binary)."""
    return ((z > low) & (z < high)).float().mean().item()


def init_from_scores(scores: torch.Tensor, low: float = 0.5) -> torch.Tensor:
    """Mask initialisation from one-shot scores: rank-linear in ``[low, 1]`` per row (best = 1)."""
    n = scores.shape[-1]
    ranks = scores.argsort(-1, descending=True).argsort(-1).float()
    return 1.0 - (1.0 - low) * ranks / max(n - 1, 1)
