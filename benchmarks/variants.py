"""MaskPrune + recovery variants at one ratio, on the quality benchmark's budget and protocol.

    python -m mptool.benchmarks.variants --ratio 0.5 --variants \
        '[{"name": "default"}, {"name": "lr 0", "lr_mask": 0.0}, {"name": "flap init", "init": "flap"}]'

Each variant is a set of ``MaskPruneConfig`` overrides plus keys of its own: ``name``,
``init`` (which one-shot score initialises the masks: flap (the default), wanda-sp or magnitude),
``mask_tokens`` (tokens of mask learning; the rest of ``--tokens`` goes to recovery, default half),
``adapter`` ("continue", the default: recovery trains mask learning's adapter on; "fresh": a new
adapter after the cut, the behaviour before), ``recovery`` (``RecoveryConfig`` overrides, e.g.
``{"lr_schedule": "cosine"}``; one-shot rows too)
and ``seed`` (LoRA initialisation of mask learning and recovery, default 0: repeat a variant with
other seeds to see the spread). ``{"name": ..., "oneshot": "flap", "shape": [3, 3, 512]}`` is a
one-shot row instead: that method's units at that shape, then all of ``--tokens`` on recovery
(the baseline a MaskPrune variant at the same shape has to beat; ``"compensate": true`` adds
the least-squares compensation MaskPrune runs with, :mod:`mptool.compensate`); with ``"phases": [[16384, 8],
[16384, 16]]`` its recovery runs in phases of (tokens, LoRA rank), each a fresh adapter merged
before the next, on consecutive text: MaskPrune's two-phase structure without the mask learning.
Same data, calibration, seed and held-out text as ``mptool.benchmarks.quality``, so a variant
named "default" reproduces that table's "maskprune + recovery" row. Rows are appended to
``benchmarks/results/variants_<tag>.jsonl`` as they finish (a long sweep keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from mptool import distributed as D
from mptool.benchmarks.quality import RESULTS, Bench, add_data_order, budget_problem
from mptool.maskprune import MaskPruneConfig
from mptool.progress import console
from mptool.shapes import Target, describe

OWN_KEYS = ("name", "init", "mask_tokens", "seed", "oneshot", "shape", "phases", "adapter", "recovery", "compensate")



def run_oneshot(bench: Bench, ratio: float, variant: dict[str, Any]) -> dict[str, Any]:
    """One-shot units at an explicit shape, then every training token on recovery."""
    method, seed = variant["oneshot"], int(variant.get("seed", 0))
    if method not in bench.scores:
        raise ValueError(f"unknown one-shot method {method!r}: one of {', '.join(bench.scores)}")
    try:
        target = Target(*(int(v) for v in variant["shape"]))
    except (KeyError, TypeError, ValueError):
        raise ValueError('a "oneshot" variant needs "shape": [kv_heads, heads_per_group, ffn]') from None
    phases = variant.get("phases", [[bench.args.tokens, 16]])
    step_tokens = bench.step_tokens
    try:
        phases = [(int(t), int(r)) for t, r in phases]
        assert sum(t for t, _ in phases) == bench.args.tokens
        assert all(t > 0 and t % step_tokens == 0 and r > 0 for t, r in phases)
    except (TypeError, ValueError, AssertionError):
        raise ValueError(f'"phases" must be [[tokens, lora_r], ...], tokens multiples of {step_tokens} '
                         f'(batch x seq_len) summing to {bench.args.tokens}') from None
    t0 = time.perf_counter()
    pruned = bench.cut(method, target, compensated=bool(variant.get("compensate", False)))
    before = bench.ppl(pruned, f"{variant['name']} one-shot")
    offset, between = 0, []
    for i, (tokens, r) in enumerate(phases):  # each phase: a fresh adapter of rank r (alpha 2r), merged
        if i:
            between.append(bench.ppl(pruned, f"{variant['name']} after phase {i}"))
        pruned = bench.recovered(pruned, tokens, bench.model, seed=seed, offset=offset, lora_r=r, lora_alpha=2 * r,
                                 **variant.get("recovery", {}))
        offset += bench.steps(tokens) * bench.args.batch_size
    return {"name": variant["name"], "ratio": ratio, "oneshot": method, "seed": seed, "init": method,
            "compensated": bool(variant.get("compensate", False)),
            "mask_tokens": 0, "recovery_tokens": bench.args.tokens, "phases": phases,
            "recovery": variant.get("recovery", {}), "ppl_between_phases": between,
            **describe(bench.d, target), "ppl_before_recovery": before, "ppl": bench.ppl(pruned, variant["name"]),
            "seconds": round(time.perf_counter() - t0, 1)}


def run_variant(bench: Bench, ratio: float, variant: dict[str, Any],
                metrics_path: Path | None = None) -> dict[str, Any]:
    if "oneshot" in variant:
        return run_oneshot(bench, ratio, variant)
    a = bench.args
    overrides = {k: v for k, v in variant.items() if k not in OWN_KEYS}
    seed = int(variant.get("seed", 0))
    init = variant.get("init", MaskPruneConfig().init)
    if init not in bench.scores:
        raise ValueError(f"unknown init score {init!r}: one of {', '.join(bench.scores)}")
    step_tokens = bench.step_tokens
    mask_tokens = int(variant.get("mask_tokens", bench.half()))
    if not 0 < mask_tokens <= a.tokens or mask_tokens % step_tokens:
        raise ValueError(f"mask_tokens must be a multiple of {step_tokens} (batch x seq_len) in (0, {a.tokens}], "
                         f"got {mask_tokens}")
    adapter = variant.get("adapter", "continue")
    if adapter not in ("continue", "fresh"):
        raise ValueError(f'"adapter" must be "continue" or "fresh", got {adapter!r}')
    t0 = time.perf_counter()
    rec_tokens = a.tokens - mask_tokens
    pruned, target, info = bench.maskprune(ratio, mask_tokens, scores=init, seed=seed, rec_tokens=rec_tokens,
                                           rec_kw={"adapter": adapter, **variant.get("recovery", {})},
                                           metrics_path=metrics_path, **overrides)
    before = info.get("ppl_before_recovery")
    if before is None:
        before = bench.ppl(pruned, variant["name"])
    return {"name": variant["name"], "ratio": ratio, "overrides": overrides, "init": init, "seed": seed,
            "mask_tokens": mask_tokens, "recovery_tokens": rec_tokens,
            "adapter": adapter if rec_tokens else None, "recovery": variant.get("recovery", {}), **describe(bench.d, target),
            "ppl_before_recovery": before, "ppl": bench.ppl(pruned, variant["name"]) if rec_tokens else before,
            "final_violation": info["final_violation"], "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", required=True, help="JSON list of variants (see above)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=32768, help="training tokens per variant, in all")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--device", default="cpu", choices=list(D.DEVICES))
    add_data_order(ap)
    ap.add_argument("--tag", default="smollm2")
    ap.add_argument("--out", default=None, help="JSONL file (default benchmarks/results/variants_<tag>.jsonl)")
    ap.add_argument("--metrics-dir", default=None,
                    help="write each MaskPrune variant's per-step metrics (mask learning, then a continued "
                         "recovery) to DIR/<name>.jsonl, the rows `mptool compress` writes to metrics.jsonl")
    args = ap.parse_args(argv)
    problem = budget_problem(args)
    if problem:
        ap.error(problem)
    try:
        variants = json.loads(args.variants)
        assert isinstance(variants, list) and all(isinstance(v, dict) and "name" in v for v in variants)
    except (json.JSONDecodeError, AssertionError):
        ap.error('--variants must be a JSON list of objects, each with a "name"')
    out = Path(args.out or RESULTS / f"variants_{args.tag}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    args.ablations, args.ratios = False, str(args.ratio)
    torch.manual_seed(0)
    bench = Bench(args, table=False)
    command = "python -m mptool.benchmarks.variants " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in (("ratio", args.ratio), ("tokens", args.tokens),
                                                    ("seq_len", args.seq_len), ("batch_size", args.batch_size),
                                                    ("calib_tokens", args.calib_tokens),
                                                    ("eval_tokens", args.eval_tokens),
                                                    ("data_order", args.data_order)))
    metrics_dir = Path(args.metrics_dir) if args.metrics_dir else None
    if metrics_dir is not None:
        metrics_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for v in variants:
        metrics = None
        if metrics_dir is not None:
            metrics = metrics_dir / (re.sub(r"[^A-Za-z0-9.]+", "_", v["name"]).strip("_") + ".jsonl")
            metrics.unlink(missing_ok=True)  # a rerun of the same name replaces, never appends
        row = {**run_variant(bench, args.ratio, dict(v), metrics_path=metrics), "dense_ppl": bench.dense_ppl,
               "data_order": args.data_order, "command": command}
        rows.append(row)
        console.print(f"[bold]{row['name']}[/bold]: ({row['kv_heads']}, {row['heads_per_group']}, {row['ffn']}) "
                      f"ppl {row['ppl_before_recovery']:.2f} -> {row['ppl']:.2f}")
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    main()
