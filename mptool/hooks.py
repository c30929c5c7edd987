"""Forward pre-hooks on ``o_proj`` and ``down_proj``: masks and activation statistics.

A mask multiplies a unit's output: a query head's attention output before ``o_proj``, an FFN
channel's ``act(gate) * up`` before ``down_proj``. Hooking the *inputs* of those two projections
does that for every family without copying model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from mptool.families import get_adapter
from mptool.shapes import Dims
from mptool.surgery import LayerKeep


@dataclass
class HookSet:
    """Registered hooks; ``remove()`` restores the plain model."""

    handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _projections(model: Any) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    a = get_adapter(model.config)
    return [
        (getattr(a.attention(layer), a.o), getattr(a.ffn(layer), a.down))
        for layer in a.decoder_layers(model)
    ]


def apply_masks(model: Any, head_masks: Callable[[int], torch.Tensor] | Sequence[torch.Tensor],
                ffn_masks: Callable[[int], torch.Tensor] | Sequence[torch.Tensor]) -> HookSet:
    """Multiply o_proj inputs by per-head masks and down_proj inputs by per-channel masks.

    Args:
        head_masks: per layer, a ``[num_heads]`` mask (or a callable ``layer -> mask``, evaluated
            at every forward, so trainable masks and schedules work).
        ffn_masks: per layer, an ``[intermediate_size]`` mask (or such a callable).
    """
    d = Dims.from_config(model.config)
    get_h = head_masks if callable(head_masks) else head_masks.__getitem__
    get_f = ffn_masks if callable(ffn_masks) else ffn_masks.__getitem__
    hooks = HookSet()
    for i, (o_proj, down) in enumerate(_projections(model)):

        def o_hook(mod: Any, args: tuple, i: int = i) -> tuple:
            x = args[0]
            m = get_h(i).to(device=x.device, dtype=x.dtype).repeat_interleave(d.head_dim)
            return (x * m,) + args[1:]

        def d_hook(mod: Any, args: tuple, i: int = i) -> tuple:
            x = args[0]
            return (x * get_f(i).to(device=x.device, dtype=x.dtype),) + args[1:]

        hooks.handles.append(o_proj.register_forward_pre_hook(o_hook))
        hooks.handles.append(down.register_forward_pre_hook(d_hook))
    return hooks


def keeps_to_masks(d: Dims, keeps: Sequence[LayerKeep]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Binary per-layer head and FFN masks equivalent to a keep spec."""
    heads, ffn = [], []
    for k in keeps:
        h = torch.zeros(d.num_heads)
        h[k.query_heads(d.heads_per_group)] = 1.0
        f = torch.zeros(d.intermediate_size)
        f[k.ffn] = 1.0
        heads.append(h)
        ffn.append(f)
    return heads, ffn


@dataclass
class InputStats:
    """Running per-column statistics of a projection's input (float64 accumulators)."""

    n: int = 0
    sum: torch.Tensor | None = None
    sumsq: torch.Tensor | None = None
    amax: torch.Tensor | None = None
    """Per-column largest |input| over all tokens seen."""
    track_gram: bool = False
    gram: torch.Tensor | None = None
    """``[in, in]`` sum of ``x x^T`` over all tokens seen (only with ``track_gram``), for
    :mod:`mptool.compensate`."""
    gram_owner: int | None = None
    """Several processes with the Gram matrices shared out (:func:`mptool.distributed.owner`): the
    one rank that keeps this Gram. Each batch's is summed over the ranks onto it as it is made (a
    collective: every rank's hook calls it, in step), so no process ever holds another's."""
    counting: bool = True
    """False for a batch run only to keep the collectives in step: nothing of it is recorded."""

    def update(self, x: torch.Tensor) -> None:
        if not self.counting and self.gram_owner is None:
            return
        x = x.detach().reshape(-1, x.shape[-1])
        if self.counting:
            x = x.double()
        if self.track_gram:  # summed on the host: layers x in^2 float64 would crowd a GPU
            g = x.T @ x if self.counting else torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            if self.gram_owner is not None:
                from mptool import distributed as D

                # the owner adds what the others counted even on a batch it does not count itself
                g = D.reduce_to(g, self.gram_owner)
            if g is not None:
                g = g.cpu()
                self.gram = g if self.gram is None else self.gram.add_(g)
        if not self.counting:
            return
        s, q, m = x.sum(0), (x * x).sum(0), x.abs().amax(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = q if self.sumsq is None else self.sumsq + q
        self.amax = m if self.amax is None else torch.maximum(self.amax, m)
        self.n += x.shape[0]

    @property
    def l2(self) -> torch.Tensor:
        """Per-column L2 norm of the input over all tokens seen."""
        return self.sumsq.sqrt()

    @property
    def var(self) -> torch.Tensor:
        """Per-column variance over tokens (FLAP's fluctuation)."""
        mean = self.sum / self.n
        return (self.sumsq / self.n - mean * mean).clamp_min(0)


def collect_stats(model: Any, gram: bool = False,
                  share_grams: bool = False) -> tuple[HookSet, list[InputStats], list[InputStats]]:
    """Hooks that accumulate input statistics of every o_proj and down_proj (``gram``: their
    input Gram matrices too, float64: ``layers x (hidden^2 + intermediate^2) x 8`` bytes;
    ``share_grams``: each layer's on its owner rank only, :attr:`InputStats.gram_owner`)."""
    from mptool import distributed as D

    hooks = HookSet()
    o_stats, d_stats = [], []
    for layer, (o_proj, down) in enumerate(_projections(model)):
        owner = D.owner(layer) if gram and share_grams else None
        so, sd = InputStats(track_gram=gram, gram_owner=owner), InputStats(track_gram=gram, gram_owner=owner)
        o_stats.append(so)
        d_stats.append(sd)
        hooks.handles.append(o_proj.register_forward_pre_hook(lambda m, a, s=so: s.update(a[0])))
        hooks.handles.append(down.register_forward_pre_hook(lambda m, a, s=sd: s.update(a[0])))
    return hooks, o_stats, d_stats
