"""Pure tensor maths of uniform masks: top-k binarisation, proximal and dual steps, sizes.

No state and no hooks: every function takes tensors (or numbers) and returns new ones, so each is
unit-tested on its own. Shapes: per-layer masks are stacked as ``[num_layers, units]``.
"""

from __future__ import annotations

import torch


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Binary mask keeping the ``k`` largest entries of each row (ties broken by index).

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
