"""Which signal picks the FFN channels best at a fixed shape: one-shot scores or the mask gradient?

    python -m mptool.benchmarks.saliency --kv-heads 3 --heads-per-group 3 --ffn 512 --recover

At a fixed target the only question left is which units each layer keeps. MaskPrune's mask step
moves each mask along its straight-through gradient ``g`` (the derivative of KD + LM w.r.t. the
unit's gate at the current hard mask): ``-g`` is the first-order value of a unit (for a kept unit
the loss increase of removing it, for a pruned one the decrease of adding it back). This
benchmark asks whether that signal, given the same calibration tokens, ranks FFN channels better
than the one-shot scores it starts from. Selections (attention units come from wanda-sp in every
row, so rows differ in FFN channels only):

* ``wanda-sp``, ``flap``: the one-shot scores (mptool's baselines);
* ``first-order``: ``-g`` averaged over the calibration sequences at the wanda-sp hard mask (KD + LM);
  ``first-order (1 batch)``: one batch of ``--batch-size`` sequences, what one mask step sees;
* ``wanda-sp + c x first-order``: the rank-linear wanda-sp initialisation moved by ``c`` along the
  RMS-normalised ``-g`` (what ``c / lr_mask`` mask steps do with LoRA left out);
* ``fisher @ dense`` / ``fisher @ wanda-sp``: the second-order saliency ``E[g^2]`` over single
  sequences (Molchanov et al. 2019, the empirical-Fisher estimate of the loss change), at the dense
  model (LM loss: KD has no gradient there) and at the wanda-sp hard mask (KD + LM);
* ``<score> + fisher``: ranks of a one-shot score and of ``fisher @ wanda-sp`` averaged.

Held-out perplexity of each with no training; with ``--recover``, the one-shot and rank-averaged
ones also after the quality benchmark's recovery (``--tokens`` of LoRA + KD), the protocol of
``mptool.benchmarks.quality``. Also the gradient's signal-to-noise: per channel, |mean| / standard
error over the calibration sequences. Writes ``benchmarks/results/saliency_<tag>.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mptool import distributed as D
from mptool import masks as M
from mptool.baselines import Scores, select
from mptool.benchmarks.quality import RESULTS, Bench, add_data_order, recorded_command
from mptool.hooks import apply_masks
from mptool.io import write_json
from mptool.maskprune import autocast, kd_loss, lm_loss
from mptool.progress import console, step
from mptool.shapes import Target, describe
from mptool.surgery import materialize


def ffn_gate_gradients(model: Any, blocks: torch.Tensor, point: torch.Tensor, per: int = 1, kd: bool = True,
                       lm_weight: float = 0.5, bf16: bool = True,
                       progress: Callable[..., None] | None = None) -> torch.Tensor:
    """Gradients of KD + ``lm_weight`` x LM w.r.t. the FFN gates at ``point`` (``[layers, ffn]``).

    The model's weights are frozen; gates multiply the inputs of ``down_proj`` (the mask hooks of
    MaskPrune); the teacher is the same model with every gate at 1. Returns ``[n, layers, ffn]``,
    one gradient per ``per`` sequences of ``blocks``. ``kd=False``: the LM loss alone (weight 1).
    """
    d_i = point.shape[-1]
    state: dict[str, Any] = {"f": point, "on": True}
    for p in model.parameters():
        p.requires_grad_(False)
    n_heads = model.config.num_attention_heads
    hooks = apply_masks(model, lambda i: torch.ones(n_heads),
                        lambda i: state["f"][i] if state["on"] else torch.ones(d_i))
    dev = next(model.parameters()).device
    out = []
    try:
        for start in range(0, len(blocks) - per + 1, per):
            x = blocks[start:start + per].to(dev)
            teacher = None
            if kd:
                state["on"] = False
                with torch.no_grad(), autocast(bf16, dev):
                    teacher = model(x).logits
                state["on"] = True
            z = point.clone().to(dev).requires_grad_(True)
            state["f"] = z
            with autocast(bf16, dev):
                logits = model(x).logits
            loss = (kd_loss(logits, teacher, 1.0, 2048) + lm_weight * lm_loss(logits, x)) if kd else lm_loss(logits, x)
            loss.backward()
            out.append(z.grad.detach().float().cpu())
            if progress:
                progress(per)
    finally:
        hooks.remove()
    return torch.stack(out)


def _ranks(s: torch.Tensor) -> torch.Tensor:
    return s.argsort(-1).argsort(-1).float()


def snr(grads: torch.Tensor) -> torch.Tensor:
    """Per unit: |mean| / standard error of the mean over the first axis (a t statistic)."""
    n = grads.shape[0]
    return grads.mean(0).abs() / (grads.std(0) / n ** 0.5 + 1e-12)


def selections(scores: dict[str, Scores], g_mask: torch.Tensor, g_dense: torch.Tensor, batch: int,
               steps: tuple[float, ...] = (0.01, 0.05)) -> dict[str, torch.Tensor]:
    """FFN scores of every selection in the module docstring (higher = kept)."""
    ws, fl = scores["wanda-sp"].ffn, scores["flap"].ffn
    first = -g_mask.mean(0)
    fisher_mask = g_mask.pow(2).mean(0)
    rms = float(g_mask.mean(0).pow(2).mean().sqrt()) + 1e-12
    out = {"wanda-sp": ws, "flap": fl, "first-order": first,
           "first-order (1 batch)": -g_mask[:batch].mean(0)}
    init = M.init_from_scores(ws)
    for c in steps:
        out[f"wanda-sp + {c} x first-order"] = init + c * first / rms
    out["fisher @ dense"] = g_dense.pow(2).mean(0)
    out["fisher @ wanda-sp"] = fisher_mask
    out["wanda-sp + fisher"] = _ranks(ws) + _ranks(fisher_mask)
    out["flap + fisher"] = _ranks(fl) + _ranks(fisher_mask)
    return out


RECOVER = ("wanda-sp", "flap", "wanda-sp + fisher", "flap + fisher")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--heads-per-group", type=int, default=3)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--recover", action="store_true", help=f"also recover: {', '.join(RECOVER)}")
    ap.add_argument("--tokens", type=int, default=32768, help="recovery tokens (--recover)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--calib-tokens", type=int, default=16384, help="calibration and gradient tokens")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    add_data_order(ap)
    ap.add_argument("--device", default="cpu", choices=list(D.DEVICES))
    ap.add_argument("--tag", default="smollm2")
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/saliency_<tag>.json)")
    args = ap.parse_args(argv)
    args.ablations, args.ratios = False, "0"
    out = Path(args.out or RESULTS / f"saliency_{args.tag}.json")
    torch.manual_seed(0)
    started = time.perf_counter()
    bench = Bench(args, table=False)
    target = Target(args.kv_heads, args.heads_per_group, args.ffn)
    model, calib = bench.model, bench.calib
    wmask = M.topk_mask(bench.scores["wanda-sp"].ffn, target.ffn)
    t0 = time.perf_counter()
    with step("gate gradients @ wanda-sp (KD + LM)", total=len(calib)) as adv:
        g_mask = ffn_gate_gradients(model, calib, wmask, progress=adv)
    with step("gate gradients @ dense (LM)", total=len(calib)) as adv:
        g_dense = ffn_gate_gradients(model, calib, torch.ones_like(wmask), kd=False, progress=adv)
    grad_s = time.perf_counter() - t0
    ranks = bench.scores["wanda-sp"].ffn.argsort(-1, descending=True).argsort(-1)
    near = (ranks >= target.ffn - 100) & (ranks < target.ffn + 100)
    t = snr(g_mask)
    stats = {"median_t_near_boundary": float(t[near].median()),
             "frac_t_above_2_near_boundary": float((t[near] > 2).float().mean()),
             "frac_t_above_2": float((t > 2).float().mean()), "sequences": len(calib),
             "gradient_seconds": round(grad_s, 1)}
    rows = []
    ws = bench.scores["wanda-sp"]
    for name, ffn_scores in selections(bench.scores, g_mask, g_dense, args.batch_size).items():
        keeps = select(Scores(ws.heads, ws.groups, ffn_scores), target)
        kept = M.topk_mask(ffn_scores, target.ffn) > 0
        pruned = materialize(model, keeps)
        row = {"selection": name, "ppl": bench.ppl(pruned, name),
               "ffn_changed_vs_wanda_sp": M.churn(wmask > 0, kept)}
        if args.recover and name in RECOVER:
            row["ppl_after_recovery"] = bench.ppl(bench.recovered(pruned, args.tokens, model), f"{name} + rec")
        rows.append(row)
        console.print(f"[bold]{name}[/bold]: ppl {row['ppl']:.2f}"
                      + (f" -> {row['ppl_after_recovery']:.2f}" if "ppl_after_recovery" in row else "")
                      + f" ({row['ffn_changed_vs_wanda_sp']:.1%} of kept channels differ from wanda-sp)")
    result = {"target": describe(bench.d, target), "dense_ppl": bench.dense_ppl, "gradient_snr": stats,
              "rows": rows, "recovery_tokens": args.tokens if args.recover else 0,
              "protocol": {"eval_tokens": args.eval_tokens, "text": "austen:persuasion",
                           "calib_tokens": args.calib_tokens, "seq_len": args.seq_len,
                           "data_order": args.data_order},
              "seconds": round(time.perf_counter() - started, 1),
              "command": recorded_command("mptool.benchmarks.saliency", argv, args)}
    write_json(out, result, indent=1)
    return result


if __name__ == "__main__":
    main()
