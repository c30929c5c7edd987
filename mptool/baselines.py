"""One-shot uniform pruning scores: magnitude, Wanda-sp and FLAP (no training).

Each method gives a score per unit per layer (query heads, KV groups, FFN channels); selection
keeps the same count in every layer (:func:`select`). They are the baselines MaskPrune is
measured against and its optional mask initialisation.

* ``magnitude``: weight norms only. FFN channel ``c``: ``|gate_c| * |up_c| * |down_{:,c}|``;
  head ``h``: ``|W_q[h]| * |W_o[:, h]|``.
* ``wanda-sp`` (structured Wanda, as in the FLAP paper's baseline): for each input column ``j``
  of ``o_proj`` / ``down_proj``, ``sum_i |W_ij| * ||X_j||_2`` over calibration tokens, summed
  over a unit's columns.
* ``flap``: the fluctuation metric ``Var(X_j) * ||W_{:,j}||^2``, summed over a unit's columns.
  FLAP's bias compensation is not applied: it needs biases on ``o_proj``/``down_proj``, which
  Mistral/Qwen2 checkpoints cannot hold, Qwen3 only on ``o_proj`` and Llama only with
  ``attention_bias``/``mlp_bias`` (which add q/k/v and gate/up biases too), and the result must
  keep the dense model's layout.

A KV group's score is the sum of its query heads' scores (plus its k/v norms for magnitude).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from mptool.errors import MptoolError
from mptool.families import get_adapter
from mptool.hooks import InputStats, collect_stats
from mptool.masks import group_topk, mask_indices, rank_first, topk_mask
from mptool.shapes import Dims, Target
from mptool.surgery import LayerKeep

METHODS = ("magnitude", "wanda-sp", "flap")


@dataclass
class Scores:
    """Per-layer unit scores: heads ``[L, G, R]``, groups ``[L, G]``, FFN ``[L, I]``."""

    heads: torch.Tensor
    groups: torch.Tensor
    ffn: torch.Tensor


def _per_head(col_scores: torch.Tensor, d: Dims) -> torch.Tensor:
    return col_scores.reshape(d.num_kv_heads, d.heads_per_group, d.head_dim).sum(-1)


def _whole(w: torch.Tensor) -> torch.Tensor:
    """A weight as one tensor: an FSDP shard is gathered (a collective: every rank, same order)."""
    return w.full_tensor() if hasattr(w, "full_tensor") else w


def _layer_weights(model: Any):
    """Per decoder layer, the q, k, v, o, gate, up, down weights (whole, one layer at a time)."""
    a = get_adapter(model.config)
    for layer in a.decoder_layers(model):
        attn, mlp = a.attention(layer), a.ffn(layer)
        yield tuple(_whole(getattr(mod, name).weight) for mod, name in (
            (attn, a.q), (attn, a.k), (attn, a.v), (attn, a.o), (mlp, a.gate), (mlp, a.up), (mlp, a.down)))


@torch.no_grad()
def calibrate(model: Any, blocks: torch.Tensor, batch_size: int = 4,
              progress: Callable[[int], None] | None = None,
              gram: bool = False, split: bool = False, run: Any = None,
              share_grams: bool = False) -> tuple[list[InputStats], list[InputStats]]:
    """Run calibration blocks through the model; return input stats of o_proj and down_proj
    (with their Gram matrices if ``gram``, for :mod:`mptool.compensate`).

    ``split``: every process of a multi-process run calls this; the blocks are shared out
    (contiguous, in batch order) and the statistics summed (maxima: the maximum) over the
    processes, so every process gets those of all blocks. Under FSDP each forward is a
    collective, so a process whose share ran out runs the others' last batches unrecorded.
    ``run``: the module to call (a wrapper of ``model``, such as the FSDP root; default ``model``).
    ``share_grams`` (with ``split``): each layer's Gram matrices end on one process only
    (:func:`mptool.distributed.owner`; None elsewhere), summed onto it batch by batch, so a process
    holds its share of the layers' Grams instead of all of them.
    """
    from mptool import distributed as D

    ranks, rank = (D.world_size(), D.rank()) if split else (1, 0)
    batches = [blocks[i:i + batch_size] for i in range(0, len(blocks), batch_size)]
    turns = -(-len(batches) // ranks)
    mine = batches[rank * turns:(rank + 1) * turns]
    hooks, o_stats, d_stats = collect_stats(model, gram, share_grams=share_grams and ranks > 1)
    dev = next(model.parameters()).device
    with hooks:
        for i in range(turns):
            if i == len(mine):  # the rest keep the collectives in step and are not counted
                for s in o_stats + d_stats:
                    s.counting = False
            (run or model)((mine[i] if i < len(mine) else batches[-1]).to(dev))
            if progress:
                progress(sum(len(b) for b in batches[i::turns]))
    if ranks > 1:
        d = Dims.from_config(model.config)
        for stats, width in ((o_stats, d.num_heads * d.head_dim), (d_stats, d.intermediate_size)):
            for s in stats:
                D.merge_stats_(s, width, dev)
    return o_stats, d_stats


def needs_calibration(methods: Sequence[str], protect: float, gram: bool) -> bool:
    """Whether the one-shot results asked for need a calibration pass (magnitude alone does not)."""
    return gram or protect > 0 or any(m != "magnitude" for m in methods)


def one_shot_results(model: Any, methods: Sequence[str], o_stats: list[InputStats] | None,
                     d_stats: list[InputStats] | None, protect: float,
                     gram: bool) -> tuple[dict[str, Scores], torch.Tensor, tuple[list, list] | None]:
    """From a calibration pass's statistics (None where none was needed): the scores of each
    method, the FFN channels ``protect`` keeps (:func:`massive_channels`) and, with ``gram``, the
    Gram matrices of every o_proj and down_proj."""
    from mptool.compensate import grams_of

    return ({m: score(model, m, o_stats, d_stats) for m in dict.fromkeys(methods)},
            massive_channels(model, d_stats, protect), grams_of(o_stats, d_stats) if gram else None)


@torch.no_grad()
def score(model: Any, method: str, o_stats: list[InputStats] | None = None,
          d_stats: list[InputStats] | None = None) -> Scores:
    """Unit scores for ``method``; activation-aware methods need the calibration stats."""
    if method not in METHODS:
        raise MptoolError(f"unknown method {method!r}; one-shot methods are {', '.join(METHODS)}")
    if method != "magnitude" and (o_stats is None or d_stats is None):
        raise ValueError(f"{method} needs calibration statistics")
    d = Dims.from_config(model.config)
    heads, groups, ffn = [], [], []
    for i, (wq, wk, wv, wo, wg, wu, wd) in enumerate(_layer_weights(model)):
        wo, wd = wo.double(), wd.double()
        if method == "magnitude":
            q = wq.double().reshape(d.num_heads, -1).norm(dim=1)
            o = wo.reshape(d.hidden_size, d.num_heads, d.head_dim).norm(dim=(0, 2))
            h = (q * o).reshape(d.num_kv_heads, d.heads_per_group)
            kv = (wk.double().reshape(d.num_kv_heads, -1).norm(dim=1)
                  * wv.double().reshape(d.num_kv_heads, -1).norm(dim=1))
            g = h.sum(-1) + kv
            f = wg.double().norm(dim=1) * wu.double().norm(dim=1) * wd.norm(dim=0)
        elif method == "wanda-sp":
            h = _per_head(wo.abs().sum(0) * o_stats[i].l2, d)
            g = h.sum(-1)
            f = wd.abs().sum(0) * d_stats[i].l2
        else:  # flap
            h = _per_head(o_stats[i].var * wo.pow(2).sum(0), d)
            g = h.sum(-1)
            f = d_stats[i].var * wd.pow(2).sum(0)
        heads.append(h)
        groups.append(g)
        ffn.append(f)
    return Scores(torch.stack(heads).float(), torch.stack(groups).float(), torch.stack(ffn).float())


@torch.no_grad()
def massive_channels(model: Any, d_stats: list[InputStats], factor: float) -> torch.Tensor:
    """``[layers, intermediate]`` bool: the FFN channels that write massive values into the
    residual stream, to be kept whatever the method's ranking.

    A channel's largest write is ``max_t |x_c(t)| * max_j |W_down[j, c]|`` over the calibration
    tokens (exact: the two factors are independent). A handful of channels write thousands of
    times their layer's median: those that create a model's massive activations (Sun et al.,
    2024) and those in a late layer that cancel them again. A ranking summed over tokens, or a
    KD gradient through the final norm, can drop a canceller (MaskPrune did, in SmolLM2's layer
    28 at 20%): the residual entering the final norm then stays thousands of times too large,
    which costs accuracy and overflows fp16 engines. ``factor`` 0: none.
    """
    d = Dims.from_config(model.config)
    out = torch.zeros(d.num_layers, d.intermediate_size, dtype=torch.bool)
    if factor <= 0:
        return out
    for i, (*_, wd) in enumerate(_layer_weights(model)):
        write = d_stats[i].amax.to(wd.device) * wd.detach().abs().double().amax(0)
        out[i] = (write > factor * write.median()).cpu()
    return out


def protect(scores: Scores, protected: torch.Tensor) -> Scores:
    """The same scores with the protected FFN channels ranked first in every layer."""
    return Scores(scores.heads, scores.groups, rank_first(scores.ffn, protected))


def select(scores: Scores, t: Target) -> list[LayerKeep]:
    """Keep the top units of each layer: the same counts everywhere (uniform by construction)."""
    gmask, hmask = group_topk(scores.groups, scores.heads, t.kv_heads, t.heads_per_group)
    fmask = topk_mask(scores.ffn, t.ffn)
    keeps = []
    for layer in range(scores.ffn.shape[0]):
        groups = mask_indices(gmask[layer])
        keeps.append(LayerKeep(groups, [mask_indices(hmask[layer, g]) for g in groups],
                               mask_indices(fmask[layer])))
    return keeps


@torch.no_grad()
def kd_split(model: Any, scores: Scores, cands: list[Target], probe: torch.Tensor, temperature: float = 1.0,
             chunk: int | None = 2048, bf16: bool = True, grams: tuple[Any, Any] | None = None,
             owner: Any = None) -> tuple[Target, dict[str, float]]:
    """The candidate target whose units (by ``scores``) distil best from the dense model.

    Each legal candidate is scored by the KD loss, on the ``probe`` batch, of the dense model with
    only that candidate's units kept (mask hooks, no copy); the lowest wins. No training: the
    shape rule of MaskPrune (``snap_frac: 0``) applied to a one-shot score, so one-shot methods
    can use a learned split of the budget instead of the fixed "same fraction" rule. With
    ``grams`` each candidate runs with its compensation (:mod:`mptool.compensate`), as MaskPrune's
    candidates do. ``owner``: every process of a multi-process run calls this, each holding its
    layers' Gram matrices, and each layer's solves run on its owner
    (:class:`mptool.compensate.Compensator`); None: this process alone (one process, or rank 0
    choosing for the others). Returns (best target, {target: KD loss}, best first).
    """
    from mptool.hooks import apply_masks, keeps_to_masks
    from mptool.maskprune import autocast, score_shapes

    if not cands:
        raise MptoolError("no legal target within the budget to choose from")
    d = Dims.from_config(model.config)
    dev = next(model.parameters()).device
    probe = probe.to(dev)
    masks: dict[str, list[torch.Tensor]] = {}

    comp = None

    def keep(t: Target) -> None:
        masks["heads"], masks["ffn"] = keeps_to_masks(d, select(scores, t))
        if comp is not None:
            comp.set(torch.stack(masks["heads"]), torch.stack(masks["ffn"]))

    with autocast(bf16, dev):
        teacher = model(probe).logits
        with apply_masks(model, lambda i: masks["heads"][i], lambda i: masks["ffn"][i]) as hooks:
            if grams is not None:
                from mptool.compensate import Compensator
                from mptool.hooks import _projections

                comp = Compensator(_projections(model), grams, d.head_dim, owner=owner)
                hooks.handles.extend(comp.handles)
            result = score_shapes(cands, keep, lambda: model(probe).logits, teacher, temperature, chunk,
                                  alone=owner is None)
    best = min(result, key=result.get)
    return best, {str(t): round(v, 4) for t, v in sorted(result.items(), key=lambda kv: kv[1])}
