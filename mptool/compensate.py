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
def regression(gram: torch.Tensor, kept: torch.Tensor, width: int, damp: float = DAMP[1],
               frozen: torch.Tensor | None = None,
               device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The weight-free part of :func:`delta` (its cost: a solve in the kept block of the Gram):
    (which kept columns regress, the dropped columns, ``R^T`` ``[regressors, dropped]``), or None
    when there is nothing to compensate. ``width``: the projection's input columns. ``device``:
    where the solve runs (the Gram stays on the host; its kept block goes there, float64). At
    Llama-3-8B's FFN at 50% (7 k kept of 14 k) a solve is ~9e11 float64 operations: tens of
    seconds on one CPU thread (torchrun's default), a fraction of a second on a data-centre GPU
    (estimated, not measured here: no GPU). When the device has no room for it, on the CPU."""
    return _on_device_or_host(_regression, device, gram, kept, width, damp, frozen)


def _on_device_or_host(fn: Any, device: torch.device | None, *args: Any) -> Any:
    """``fn(*args, device)``, or ``fn(*args, cpu)`` where ``device`` is None, the CPU, or has no
    room for it beside training (its float64 blocks)."""
    if device is not None and torch.device(device).type != "cpu":
        try:
            return fn(*args, torch.device(device))
        except torch.OutOfMemoryError:
            pass
    return fn(*args, torch.device("cpu"))


def _regression(gram: torch.Tensor, kept: torch.Tensor, width: int, damp: float, frozen: torch.Tensor | None,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    drop = torch.ones(width, dtype=torch.bool)
    drop[kept.cpu()] = False
    if not drop.any() or len(kept) == 0:
        return None
    g = gram.double().cpu()
    k = kept.cpu()
    use = torch.ones(len(k), dtype=torch.bool) if frozen is None else ~frozen.cpu()[k]
    r = k[use]  # the regressors
    d = drop.nonzero().squeeze(1)
    grr = g[r.unsqueeze(1), r].to(device)
    scale = float(grr.diagonal().mean()) if len(r) else 0.0
    if scale <= 0:  # the kept inputs never fired on the calibration text: nothing to regress on
        return None
    grr.diagonal().add_(damp * scale)
    grd = g[r.unsqueeze(1), d].to(device)
    # the damped block is symmetric positive definite: Cholesky is 3x faster than LU at SmolLM2's
    # FFN size (this solve is mask learning's cost whenever a layer's kept set changes)
    chol, info = torch.linalg.cholesky_ex(grr)
    coef = torch.cholesky_solve(grd, chol) if int(info) == 0 else torch.linalg.solve(grr, grd)  # [|r|, |D|]: R^T
    return use, d, coef


@torch.no_grad()
def apply_regression(weight: torch.Tensor, kept: torch.Tensor, use: torch.Tensor, dropped: torch.Tensor,
                     coef: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """:func:`delta` from its :func:`regression`: ``W_D R`` on the regressing kept columns, 0 on
    the frozen ones, in ``weight``'s dtype; computed in float64 on ``device`` (default: where
    ``coef`` is), on the CPU when that device is out of memory."""
    return _on_device_or_host(_apply, coef.device if device is None else device, weight, kept, use, dropped, coef)


def _apply(weight: torch.Tensor, kept: torch.Tensor, use: torch.Tensor, dropped: torch.Tensor,
           coef: torch.Tensor, dev: torch.device) -> torch.Tensor:
    out = torch.zeros(weight.shape[0], len(kept), dtype=torch.float64, device=dev)
    out[:, use.to(dev)] = weight.detach()[:, dropped.to(weight.device)].to(dev, torch.float64) @ coef.to(dev).T
    return out.to(weight.dtype)


@torch.no_grad()
def delta(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damp: float = DAMP[1],
          frozen: torch.Tensor | None = None) -> torch.Tensor | None:
    """``[out, len(kept)]``: what to add to ``weight[:, kept]`` so that the kept inputs stand in for
    the dropped ones (None when nothing is dropped). ``kept``: ascending column indices;
    ``gram``: ``[in, in]`` sum of ``x x^T`` over calibration inputs; ``frozen``: ``[in]`` bool,
    kept columns that must not change (the channels that write massive activations: a small
    coefficient on their huge inputs moves the residual stream by hundreds), so the dropped
    units are predicted from the other kept ones only and their delta columns are 0."""
    fit = regression(gram, kept, weight.shape[1], damp, frozen)
    return None if fit is None else apply_regression(weight, kept, *fit)


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
               d_grams: Sequence[torch.Tensor | None], into: Any = None,
               protected: torch.Tensor | None = None, owner: Any = None) -> None:
    """Add each layer's compensation, computed from ``model``'s (dense) weights, to the kept
    columns of ``o_proj`` / ``down_proj``: of ``model`` itself (slice it with the same ``keeps``
    afterwards), or of ``into``, ``model`` already sliced to ``keeps``
    (:func:`mptool.surgery.materialize`; it stores the kept columns in ascending order). In place.
    ``o_grams`` / ``d_grams``: per layer, the Gram of the dense model's inputs of those projections
    (:func:`mptool.baselines.calibrate` with ``gram=True``), each solved with its projection's
    :data:`DAMP`; ``protected``: ``[layers,
    intermediate]`` bool, FFN channels kept out of the regression (``delta``'s ``frozen``), as
    MaskPrune's training ran them.

    ``owner(layer)`` (several processes, every one with the same ``keeps`` and the dense weights,
    each with the Gram matrices of its own layers only, None elsewhere: :func:`mptool.distributed.to_owners`):
    each layer's delta is solved on its owner and broadcast, one at a time, so every process ends
    with the same weights."""
    from mptool import distributed as D
    from mptool.hooks import _projections

    d = Dims.from_config(model.config)
    src = _projections(model)
    dst = src if into is None else _projections(into)
    for i, keep in enumerate(keeps):
        for j, (gram, kept) in enumerate(zip((o_grams[i], d_grams[i]), kept_columns(d, keep))):
            w = src[i][j].weight
            mine = owner is None or owner(i) == D.rank()
            dw = delta(w, gram, kept, DAMP[j], frozen=frozen_columns(protected, i, j)) if mine else None
            if owner is not None:  # whether the owner found one, then the delta itself
                if not D.broadcast_(torch.tensor([float(dw is not None)]), src=owner(i)).item():
                    continue
                if dw is None:
                    dw = torch.empty(w.shape[0], len(kept), dtype=w.dtype, device=w.device)
                dw = D.broadcast_(dw, src=owner(i))
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


def host_gram_bytes(d: Dims, processes: int = 1, shares: int = 1, whole: int = 0) -> int:
    """Host memory of the Gram matrices of ``processes`` processes on one host, each holding all
    of them or, with ``shares``, its share of the layers (:func:`mptool.shapes.gram_bytes`), except
    ``whole`` of them that hold all at once (rank 0 calibrating a one-shot method for the others:
    counted on every host, to be safe)."""
    whole = min(whole, processes)
    return whole * gram_bytes(d) + (processes - whole) * gram_bytes(d, shares)


def fits(d: Dims, processes: int = 1, available: int | None = None, shares: int = 1, whole: int = 0) -> bool:
    """Whether the Gram matrices of this host's processes (:func:`host_gram_bytes`) take at most
    half the available host memory (where that is unknown: yes). The automatic ``compensate``
    choice: all of them are 0.6 GB at SmolLM2-135M, 57 GB at Llama-3-8B, 569 GB at Llama-3-70B."""
    available = available_bytes() if available is None else available
    return available is None or host_gram_bytes(d, processes, shares, whole) <= available / 2


class Compensator:
    """Forward hooks that run a hard structure with its compensation, weights untouched.

    Each hooked ``o_proj`` / ``down_proj`` adds ``delta @ x[kept columns]`` to its output, where
    its input ``x`` already has the dropped units zeroed by the mask hooks
    (:func:`mptool.hooks.apply_masks`). :meth:`set` gives the kept units; a layer's delta is
    recomputed only when its kept set changes (it depends on nothing else). ``gate()`` False (a
    teacher pass with the masks off) or :meth:`set` never called: the plain forward.

    With ``owner`` (several processes, each holding at least the Gram matrices of its own layers:
    :func:`mptool.distributed.owner`), a changed layer's solve runs on its owner and the delta is
    broadcast, so every process ends with the same deltas and the solves are shared out; every
    process must call :meth:`set` with the same masks (checked: a mismatch raises on every
    process instead of hanging at a collective).
    """

    def __init__(self, projections: Sequence[tuple[Any, Any]], grams: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
                 head_dim: int, weight: Any = None, gate: Any = None, device: torch.device | None = None,
                 frozen: Any = None, owner: Any = None) -> None:
        """``projections``: per layer, (o_proj, down_proj) modules; ``weight(layer, j)``: the dense
        weight of projection j (0: o_proj, 1: down_proj) of a layer (default: the module's own);
        ``frozen(layer, j)``: input columns kept out of the regression (:func:`delta`), or None;
        ``owner(layer)``: the rank holding that layer's Grams (None where this one holds all)."""
        self.owner = owner
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
        from mptool import distributed as D

        self.on = True
        changed = []  # (layer, projection, kept set, kept columns, input width): alike on every rank
        for layer in range(len(self.projections)):
            for j, kept in enumerate((heads[layer].detach() != 0, ffn[layer].detach() != 0)):
                kept = kept.cpu()
                key = kept.numpy().tobytes()
                old = self.entries.get((layer, j))
                if old is not None and old[0] == key:
                    continue
                idx = kept.nonzero().squeeze(1)
                cols = head_columns(idx, self.head_dim) if j == 0 else idx
                changed.append((layer, j, key, cols, len(kept) * (self.head_dim if j == 0 else 1)))
        if self.owner is not None:  # the same changes on every rank, or the collectives below hang
            mark = [1.0, float(len(changed)), float(sum((2 * layer + j + 1) * (len(cols) + 1)
                                                          for layer, j, _, cols, _ in changed))]
            total = D.sum_(torch.tensor(mark, dtype=torch.float64))
            if not torch.equal(total, total[0] * torch.tensor(mark, dtype=torch.float64)):
                raise RuntimeError("the processes of this run disagree on the kept units (compensation "
                                   f"changes on rank {D.rank()}: {[(c[0], c[1]) for c in changed]})")
        if not changed:
            return
        # the solves first, each on the process holding its Gram (every one without owners); the
        # coefficients wait on the host, so the device holds one layer's blocks at a time
        mine = [self.owner is None or self.owner(layer) == D.rank() for layer, *_ in changed]
        fits = []
        for m, (layer, j, _, cols, width) in zip(mine, changed):
            fit = regression(self.grams[j][layer], cols, width, DAMP[j], frozen=self.frozen(layer, j),
                             device=self._device(layer, j)) if m else None
            fits.append(None if fit is None else (fit[0], fit[1], fit[2].cpu()))
        found = [f is not None for f in fits]
        if self.owner is not None:  # which deltas exist: their owners know, now every rank does
            found = (D.sum_(torch.tensor(found, dtype=torch.float64)) > 0).tolist()
        for m, fit, has, (layer, j, key, cols, _) in zip(mine, fits, found, changed):
            dw = None
            dev = self._device(layer, j)
            if has or self.owner is None:
                w = self.weight(layer, j)  # under FSDP a gather: every rank calls, same order
                if has:
                    dw = (apply_regression(w, cols, *fit, device=dev) if m
                          else torch.empty(w.shape[0], len(cols), dtype=w.dtype, device=dev))
                    if self.owner is not None:
                        dw = D.broadcast_(dw, src=self.owner(layer))
            self.entries[(layer, j)] = (key, cols.to(dev), None if dw is None else dw.to(dev))

    def _device(self, layer: int, j: int) -> torch.device:
        return self.device or self.projections[layer][j].weight.device

    def clear(self) -> None:
        """Forget the cached deltas (recomputed at the next :meth:`set`)."""
        self.entries = {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
