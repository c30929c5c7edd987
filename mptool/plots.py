"""PNG plots written beside the checkpoint: training curves and a per-layer map of kept units."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mptool.surgery import LayerKeep


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(history: Sequence[dict], path: Path) -> None:
    """Loss / KD, constraint violation per unit type, multipliers, targets and mask binarity."""
    plt = _plt()
    mask = [r for r in history if r.get("phase", "mask") == "mask"]
    rec = [r for r in history if r.get("phase") == "recovery"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    ax = axes[0, 0]
    if mask:
        ax.plot([r["step"] for r in mask], [r["kd"] for r in mask], label="mask learning: KD")
    if rec:
        off = mask[-1]["step"] if mask else 0
        ax.plot([off + r["step"] for r in rec], [r["loss"] for r in rec], label="recovery: loss")
    ax.set_title("loss")
    ax.set_yscale("log")
    ax.legend()
    if mask:
        steps = [r["step"] for r in mask]
        for key, label in (("viol_kv", "KV groups"), ("viol_heads", "heads/group"), ("viol_ffn", "FFN")):
            axes[0, 1].plot(steps, [r[key] for r in mask], label=label)
        axes[0, 1].set_title("constraint violation (max over layers, fraction of units)")
        axes[0, 1].legend()
        for key, label in (("y_kv", "KV groups"), ("y_heads", "heads/group"), ("y_ffn", "FFN")):
            axes[0, 2].plot(steps, [r[key] for r in mask], label=label)
        axes[0, 2].set_title("mean multiplier y")
        axes[0, 2].legend()
        for i, (key, label) in enumerate((("s_kv", "KV heads"), ("s_heads", "heads/group"), ("s_ffn", "FFN"))):
            ax = axes[1, i]
            ax.plot(steps, [r[key] for r in mask])
            ax.set_title(f"target: {label}")
        ax2 = axes[1, 0].twinx()
        ax2.plot(steps, [r["binarity"] for r in mask], color="gray", linestyle="--")
        ax2.set_ylabel("binarity (fraction in (0.05, 0.95))", color="gray")
        if "churn_ffn" in mask[0]:
            ax3 = axes[1, 2].twinx()
            ax3.plot(steps, [r["churn_ffn"] for r in mask], color="gray", linestyle="--")
            ax3.set_ylabel("FFN churn (kept units new this step)", color="gray")
    for ax in axes.flat:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def kept_heatmap(keeps: Sequence[LayerKeep], num_kv_heads: int, heads_per_group: int,
                 intermediate_size: int, path: Path) -> None:
    """Per layer: which query heads (grouped by KV group) and which FFN channels are kept."""
    import numpy as np

    plt = _plt()
    L = len(keeps)
    heads = np.zeros((L, num_kv_heads * heads_per_group))
    ffn = np.zeros((L, intermediate_size))
    for i, k in enumerate(keeps):
        heads[i, k.query_heads(heads_per_group)] = 1
        ffn[i, k.ffn] = 1
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, max(3, L * 0.18)),
                               gridspec_kw={"width_ratios": [1, 4]})
    a.imshow(heads, aspect="auto", cmap="Greens", interpolation="nearest", vmin=0, vmax=1)
    for g in range(1, num_kv_heads):
        a.axvline(g * heads_per_group - 0.5, color="black", linewidth=1)
    a.set_title("query heads kept (lines: KV groups)")
    a.set_xlabel("head")
    a.set_ylabel("layer")
    b.imshow(ffn, aspect="auto", cmap="Greens", interpolation="nearest", vmin=0, vmax=1)
    b.set_title(f"FFN channels kept ({len(keeps[0].ffn)} of {intermediate_size} in every layer)")
    b.set_xlabel("channel")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
