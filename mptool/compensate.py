"""Least-squares compensation of pruned units: the kept columns absorb what the dropped ones wrote.

For a projection ``y = W x`` whose input units can be pruned (``o_proj``: the query heads'
outputs; ``down_proj``: the FFN channels ``act(gate) * up``) and a kept set ``K`` of its input
columns, the dropped inputs are predicted linearly from the kept ones, on the dense model's
calibration inputs: ``x_D ~ R x_K`` with ``R = G_DK (G_KK + lambda I)^-1`` where ``G = sum x x^T``.
Then ``W x ~ (W_K + W_D R) x_K``: the sliced model keeps the same shapes and only the kept columns
change, by ``delta = W_D R``. This is the least-squares optimum of ``|W x - W' x_K|^2`` over the
calibration tokens (the reconstruction step of OBS-style structured pruners; FLAP's bias
compensation is its rank-0 special case, which a Llama checkpoint cannot hold). ``lambda`` is
``DAMP[j]`` (per projection) times the mean diagonal of ``G_KK``.

On SmolLM2-135M (flap's units at (3, 3, 512), 16 k calibration tokens) it takes held-out perplexity
from 367 to 86 with no training, and to 61 after 32 k tokens of recovery where the uncompensated
model reaches 73 (docs/maskprune.md).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from mptool.shapes import Dims, gram_bytes
from mptool.surgery import LayerKeep

DAMP = (1e-4, 1e-4)
"""Ridge term per projection (``o_proj``, ``down_proj``), relative to the mean diagonal of the kept
Gram block, read at each call. ``down_proj`` (SmolLM2 at 50%, (3, 3, 512), perplexity with no
training): 1e-2 / 1e-3 / 1e-4 / 1e-5 gave 91.7 / 87.6 / 86.2 / 86.0. ``o_proj`` at (2, 3, 640)
(a KV group dropped): 1e-4 / 1e-2 / 1e-1 / 1 gave 84.18 / 84.01 / 83.70 / 85.19 with no training,
and 1e-1 makes the weights 5-14x less sensitive to bf16 rounding, but after MaskPrune and
recovery at the quality table's budget it gave 66.46 against 62.12 (docs/maskprune.md), so both
stay at 1e-4."""


@torch.no_grad()
def delta(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damp: float = DAMP[1],
          frozen: torch.Tensor | None = None) -> torch.Tensor | None:
    """``[out, len(kept)]``: what to add to ``weight[:, kept]`` so that the kept inputs stand in for
    the dropped ones (None when nothing is dropped). ``kept``: ascending column indices;
    ``gram``: ``[in, in]`` sum of ``x x^T`` over calibration inputs; ``frozen``: ``[in]`` bool,
    kept columns that must not change (the channels that write massive activations: a small
    coefficient on their huge inputs moves the residual stream by hundreds), so the dropped
    units are predicted from the other kept ones only and their delta columns are 0."""
    n = weight.shape[1]
    drop = torch.ones(n, dtype=torch.bool)
    drop[kept.cpu()] = False
    if not drop.any() or len(kept) == 0:
        return None
    g = gram.double().cpu()
    k = kept.cpu()
    use = torch.ones(len(k), dtype=torch.bool) if frozen is None else ~frozen.cpu()[k]
    r = k[use]  # the regressors
    d = drop.nonzero().squeeze(1)
    grr = g[r.unsqueeze(1), r]
    scale = float(grr.diagonal().mean()) if len(r) else 0.0
    if scale <= 0:  # the kept inputs never fired on the calibration text: nothing to regress on
        return None
    grr.diagonal().add_(damp * scale)
    grd = g[r.unsqueeze(1), d]
    # the damped block is symmetric positive definite: Cholesky is 3x faster than LU at SmolLM2's
    # FFN size (this solve is mask learning's cost whenever a layer's kept set changes)
    chol, info = torch.linalg.cholesky_ex(grr)
    coef = torch.cholesky_solve(grd, chol) if int(info) == 0 else torch.linalg.solve(grr, grd)  # [|r|, |D|]: R^T
    out = torch.zeros(weight.shape[0], len(k), dtype=torch.float64)
    out[:, use] = weight.detach()[:, d.to(weight.device)].double().cpu() @ coef.T
    return out.to(weight.dtype)


def frozen_columns(protected: torch.Tensor | None, layer: int, j: int) -> torch.Tensor | None:
    """``delta``'s ``frozen`` for projection ``j`` (0: o_proj, 1: down_proj) of a layer: the
    protected FFN channels (``[layers, intermediate]`` bool) of down_proj, None where there are none."""
    if j != 1 or protected is None or not protected[layer].any():
        return None
    return protected[layer]


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The o_proj input columns of the given query heads."""
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)


def kept_columns(d: Dims, keep: LayerKeep) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_proj columns, down_proj columns) a layer keeps, ascending."""
    heads = torch.tensor(sorted(keep.query_heads(d.heads_per_group)), dtype=torch.long)
    return head_columns(heads, d.head_dim), torch.tensor(keep.ffn, dtype=torch.long)


@torch.no_grad()
def compensate(model: Any, keeps: Sequence[LayerKeep], o_grams: Sequence[torch.Tensor],
               d_grams: Sequence[torch.Tensor], into: Any = None,
               protected: torch.Tensor | None = None) -> None:
    """Add each layer's compensation, computed from ``model``'s (dense) weights, to the kept
    columns of ``o_proj`` / ``down_proj``: of ``model`` itself (slice it with the same ``keeps``
    afterwards), or of ``into``, ``model`` already sliced to ``keeps``
    (:func:`mptool.surgery.materialize`; it stores the kept columns in ascending order). In place.
    ``o_grams`` / ``d_grams``: per layer, the Gram of the dense model's inputs of those projections
    (:func:`mptool.baselines.calibrate` with ``gram=True``), each solved with its projection's
    :data:`DAMP`; ``protected``: ``[layers,
    intermediate]`` bool, FFN channels kept out of the regression (``delta``'s ``frozen``), as
    MaskPrune's training ran them."""
    from mptool.hooks import _projections

    d = Dims.from_config(model.config)
    src = _projections(model)
    dst = src if into is None else _projections(into)
    for i, keep in enumerate(keeps):
        for j, (gram, kept) in enumerate(zip((o_grams[i], d_grams[i]), kept_columns(d, keep))):
            dw = delta(src[i][j].weight, gram, kept, DAMP[j], frozen=frozen_columns(protected, i, j))
            if dw is None:
                continue
            w = dst[i][j].weight
            dw = dw.to(device=w.device, dtype=w.dtype)
            if into is None:
                w[:, kept.to(w.device)] += dw
            else:
                w += dw


def grams_of(o_stats: Sequence[Any], d_stats: Sequence[Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The (o_proj, down_proj) Gram matrices of a calibration pass made with ``gram=True``."""
    return [s.gram for s in o_stats], [s.gram for s in d_stats]


def available_bytes() -> int | None:
    """Host memory available now (``MemAvailable`` of /proc/meminfo), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def fits(d: Dims, processes: int = 1, available: int | None = None) -> bool:
    """Whether ``processes`` copies of the Gram matrices take at most half the available host
    memory (where that is unknown: yes). The automatic ``compensate`` choice: SmolLM2-135M needs
    0.6 GB, Llama-3-8B 57 GB, Llama-3-70B 569 GB."""
    available = available_bytes() if available is None else available
    return available is None or processes * gram_bytes(d) <= available / 2


class Compensator:
    """Forward hooks that run a hard structure with its compensation, weights untouched.

    Each hooked ``o_proj`` / ``down_proj`` adds ``delta @ x[kept columns]`` to its output, where
    its input ``x`` already has the dropped units zeroed by the mask hooks
    (:func:`mptool.hooks.apply_masks`). :meth:`set` gives the kept units; a layer's delta is
    recomputed only when its kept set changes (it depends on nothing else). ``gate()`` False (a
    teacher pass with the masks off) or :meth:`set` never called: the plain forward.
    """

    def __init__(self, projections: Sequence[tuple[Any, Any]], grams: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
                 head_dim: int, weight: Any = None, gate: Any = None, device: torch.device | None = None,
                 frozen: Any = None) -> None:
        """``projections``: per layer, (o_proj, down_proj) modules; ``weight(layer, j)``: the dense
        weight of projection j (0: o_proj, 1: down_proj) of a layer (default: the module's own);
        ``frozen(layer, j)``: input columns kept out of the regression (:func:`delta`), or None."""
        self.frozen = frozen or (lambda layer, j: None)
        self.projections, self.grams, self.head_dim = projections, grams, head_dim
        self.weight = weight or (lambda layer, j: projections[layer][j].weight)
        self.gate = gate or (lambda: True)
        self.device = device
        self.on = False
        self.entries: dict[tuple[int, int], tuple[bytes, torch.Tensor, torch.Tensor | None]] = {}
        """(layer, projection) -> (kept set, kept columns, delta or None)."""
        self.handles = []
        for layer, pair in enumerate(projections):
            for j, mod in enumerate(pair):
                self.handles.append(mod.register_forward_hook(self._hook(layer, j)))

    def _hook(self, layer: int, j: int) -> Any:
        def hook(mod: Any, args: tuple, out: torch.Tensor) -> torch.Tensor:
            entry = self.entries.get((layer, j)) if self.on and self.gate() else None
            if entry is None or entry[2] is None:
                return out
            _, cols, dw = entry
            return out + torch.nn.functional.linear(args[0].index_select(-1, cols), dw.to(out.dtype))
        return hook

    @torch.no_grad()
    def set(self, heads: torch.Tensor, ffn: torch.Tensor) -> None:
        """Run with the compensation of these kept units: ``heads`` ``[layers, num_heads]``,
        ``ffn`` ``[layers, intermediate]``, nonzero where kept."""
        self.on = True
        for layer in range(len(self.projections)):
            for j, kept in enumerate((heads[layer].detach() != 0, ffn[layer].detach() != 0)):
                kept = kept.cpu()
                key = kept.numpy().tobytes()
                old = self.entries.get((layer, j))
                if old is not None and old[0] == key:
                    continue
                idx = kept.nonzero().squeeze(1)
                cols = head_columns(idx, self.head_dim) if j == 0 else idx
                dw = delta(self.weight(layer, j), self.grams[j][layer], cols, DAMP[j], frozen=self.frozen(layer, j))
                dev = self.device or self.projections[layer][j].weight.device
                self.entries[(layer, j)] = (key, cols.to(dev), None if dw is None else dw.to(dev))

    def clear(self) -> None:
        """Forget the cached deltas (recomputed at the next :meth:`set`)."""
        self.entries = {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
