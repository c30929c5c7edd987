"""Quality benchmark: held-out perplexity of dense, one-shot, one-shot + recovery and MaskPrune.

    python -m mptool.benchmarks.quality --ratios 0.2,0.5 --tokens 32768 --seq-len 256 --batch-size 4 --eval-tokens 8192 --ablations   # the README table
    python -m mptool.benchmarks.quality --device cuda --tokens 475136 --seq-len 512 --batch-size 16 \
        --tag smollm2_gpu --ablations          # a larger budget on a GPU (not run yet: an H200 did
                                               # about 0.3 s per 8 k-token step, so ~40 steps a row)

Every method that trains gets the same number of training tokens ``T`` in all:

* ``<one-shot> + recovery``: the one-shot cut, then ``T`` tokens of LoRA + KD recovery;
* ``maskprune``: ``T`` tokens of mask learning (LoRA + KD inside), no recovery;
* ``maskprune + recovery``: ``T/2`` tokens of mask learning, ``T/2`` of recovery that continues
  mask learning's adapter on the frozen masks (``recovery.adapter: continue``, compress's default).

A reference row puts the dense model itself through the same recovery: recovery's LM term
adapts any model to the training text, so that row says how much of a recovered model's
perplexity is adaptation rather than repair. One-shot rows use the fixed "same fraction of
attention and FFN" split (their own rule) and, for comparison, the target MaskPrune learned at that ratio. Ablations (``--ablations``) at the
largest ratio: fixed multipliers instead of dual ascent, dual ascent with exact line search instead of
plain projected dual ascent, and LoRA only (LM loss, no teacher) instead of LoRA +
distillation, all with the same budget as ``maskprune + recovery``. One-shot methods at MaskPrune's
learned target also get the same recovery: the gap to ``maskprune + recovery`` is what the learned
selection adds beyond the learned shape.
Writes ``benchmarks/results/quality_<tag>.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mptool import distributed as D
from mptool.baselines import METHODS, calibrate, massive_channels, score, select
from mptool.benchmarks.engines import host_info
from mptool.compensate import compensate, grams_of
from mptool.compress import param_count, peak_rss_mb
from mptool.config import DataConfig
from mptool.data import DATA_ORDERS, default_texts, eval_token_stream, token_blocks
from mptool.evaluate import PplProtocol, perplexity
from mptool.io import write_results
from mptool.maskprune import MaskPrune, MaskPruneConfig
from mptool.models import load_model
from mptool.progress import console, step
from mptool.recover import RecoveryConfig, recover
from mptool.shapes import Dims, Target, balanced_target, describe, prunable_params
from mptool.surgery import materialize

RESULTS = Path(__file__).resolve().parent / "results"


class Bench:
    def __init__(self, args: argparse.Namespace, table: bool = True) -> None:
        """``table=False``: rows are not written as a quality table (the sweeps write their own)."""
        self.started = time.perf_counter()
        self.table = table
        self.args = args
        self.dev = D.device(args.device)
        self.model, self.tok = load_model(args.model)
        self.model.to(self.dev)
        self.d = Dims.from_config(self.model.config)
        train, held_out = default_texts()
        self.ids = eval_token_stream(self.tok, held_out, args.eval_tokens)
        self.protocol = PplProtocol(max_tokens=args.eval_tokens, text="austen:persuasion")
        n_blocks = args.tokens // args.seq_len
        self.blocks = token_blocks(self.tok, [train], args.seq_len, n_blocks * args.seq_len,
                                   order=args.data_order)
        self.calib = self.blocks[: args.calib_tokens // args.seq_len]
        with step("calibrate", total=len(self.calib)) as adv:
            o, dd = calibrate(self.model, self.calib, progress=adv, gram=True)
        self.scores = {m: score(self.model, m, o, dd) for m in METHODS}
        self.d_stats = dd
        self.grams = grams_of(o, dd)  # for compensation (mptool.compensate)
        self.rows: list[dict[str, Any]] = []
        self.dense_ppl = self.ppl(self.model, "dense")
        self.add("dense", 0.0, self.d.dense_target(), self.dense_ppl, tokens=0, seconds=0.0)

    def dense_reference(self) -> None:
        """The dense model through the same recovery: how much of a recovered model's perplexity
        comes from adapting to the training text (the LM term) rather than from undoing the cut."""
        import copy

        t0 = time.perf_counter()
        tuned = self.recovered(copy.deepcopy(self.model), self.args.tokens, self.model)
        self.add("dense + recovery (reference)", 0.0, self.d.dense_target(), self.ppl(tuned, "dense + recovery"),
                 self.args.tokens, time.perf_counter() - t0,
                 recovery_config=changed(self.rec_cfg(self.args.tokens), RecoveryConfig()))

    def ppl(self, model: Any, label: str) -> float:
        model.to(self.dev)
        with step(f"ppl {label}", total=self.ids.numel()) as adv:
            return perplexity(model, self.ids, self.protocol, progress=adv)["ppl"]

    def add(self, method: str, ratio: float, target: Target, ppl: float, tokens: int, seconds: float,
            **extra: Any) -> None:
        row = {"method": method, "ratio": ratio, **describe(self.d, target), "ppl": ppl,
               "ppl_x_dense": ppl / self.dense_ppl, "train_tokens": tokens, "seconds": round(seconds, 1),
               **extra}
        self.rows.append(row)
        console.print(f"[bold]{method}[/bold] @ {ratio}: {target} ppl {ppl:.2f} "
                      f"(x{row['ppl_x_dense']:.2f}) {tokens} tokens {seconds:.0f} s")
        self.save()

    @property
    def step_tokens(self) -> int:
        """Training tokens per step: ``--batch-size`` x ``--seq-len``."""
        return self.args.batch_size * self.args.seq_len

    def steps(self, tokens: int) -> int:
        return max(1, tokens // self.step_tokens)

    def half(self) -> int:
        """Mask learning's share of ``--tokens`` in the MaskPrune + recovery rows: half the steps
        (recovery gets the rest, one step more when the count is odd), so the two add up exactly."""
        return self.steps(self.args.tokens) // 2 * self.step_tokens

    def rec_cfg(self, tokens: int, **kw: Any) -> RecoveryConfig:
        return RecoveryConfig(steps=self.steps(tokens), batch_size=self.args.batch_size, **kw)

    def recovered(self, pruned: Any, tokens: int, teacher: Any, seed: int = 0, offset: int = 0, **kw: Any) -> Any:
        """Recovery on ``tokens`` from block ``offset`` on (after mask learning: the blocks it did not see)."""
        cfg = self.rec_cfg(tokens, **kw)
        with step("recovery", total=cfg.steps) as adv:
            out, _ = recover(pruned, self.blocks, cfg, teacher=teacher, progress=adv, device=self.dev, seed=seed,
                             offset=offset)
        return out

    def maskprune(self, ratio: float, tokens: int, scores: str | None = None, seed: int = 0,
                  rec_tokens: int = 0, rec_kw: dict[str, Any] | None = None,
                  metrics_path: Path | None = None, **kw: Any) -> tuple[Any, Target, dict]:
        """MaskPrune with ``tokens`` of mask learning, masks initialised from the one-shot ``scores``
        (``kw``: MaskPruneConfig overrides; ``seed``: LoRA initialisation), then ``rec_tokens`` of
        recovery (``rec_kw``: RecoveryConfig overrides; with ``adapter: "continue"``, the default,
        it continues mask learning's adapter on the frozen masks, else a fresh adapter after the
        cut). Returns (sliced model, target, run info); ``info["ppl_before_recovery"]`` is the
        perplexity at the cut when there was recovery. ``metrics_path``: every step's metrics row
        (mask learning, then a continued recovery) appended there as JSONL."""
        model, _ = load_model(self.args.model)
        model.to(self.dev)
        cfg = MaskPruneConfig(steps=self.steps(tokens), batch_size=self.args.batch_size,
                              checkpoint_every=0, **kw)
        rec = self.rec_cfg(rec_tokens, **(rec_kw or {})) if rec_tokens else None
        budget = (1 - ratio) * prunable_params(self.d, self.d.dense_target())
        protected = massive_channels(self.model, self.d_stats, cfg.protect)  # as compress does
        trainer = MaskPrune(model, self.blocks, cfg, budget=budget, init_scores=self.scores.get(scores or cfg.init),
                            device=self.dev, seed=seed, protected=protected, grams=self.grams)
        continued = rec is not None and rec.adapter == "continue"
        if continued:
            trainer.continue_with(rec)
        with step(f"mask learning @ {ratio}", total=cfg.steps) as adv:
            hist = trainer.run(metrics_path=metrics_path, progress=adv)
        info = {"final_violation": hist[-1]["hard_violation"], "binarity": hist[-1]["binarity"],
                "step_s_median": sorted(r["step_s"] for r in hist)[len(hist) // 2],
                "mask_blocks": trainer.state.step * cfg.batch_size,
                "train_tokens": (trainer.state.step + (rec.steps if rec else 0)) * self.step_tokens,
                "maskprune_config": changed(cfg, MaskPruneConfig()),
                "recovery_config": changed(rec, RecoveryConfig()) if rec else None}
        if continued:
            trainer.freeze()
            info["ppl_before_recovery"] = self.ppl(trainer.model, "maskprune, before recovery")
            with step("recovery (mask learning's adapter continued)", total=rec.steps) as adv:
                trainer.run_recovery(metrics_path=metrics_path, progress=adv)
        pruned, keeps = trainer.finish()
        if rec is not None and not continued:
            info["ppl_before_recovery"] = self.ppl(pruned, "maskprune, before recovery")
            fresh_kw = {"lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,  # mask learning's, as compress does
                        **{k: v for k, v in (rec_kw or {}).items() if k != "adapter"}}
            pruned = self.recovered(pruned, rec_tokens, self.model, seed=seed, offset=info["mask_blocks"], **fresh_kw)
        if rec is not None:
            info["recovery_adapter"] = "continued" if continued else "fresh"
        return pruned, keeps[0].target(), info

    def cut(self, method: str, target: Target, compensated: bool = False) -> Any:
        """The dense model cut to ``target`` by ``method``'s ranking (``compensated``: the kept
        columns absorb the dropped units, :mod:`mptool.compensate`)."""
        keeps = select(self.scores[method], target)
        cut = materialize(self.model, keeps)
        if compensated:
            compensate(self.model, keeps, *self.grams, into=cut)
        return cut

    def run_ratio(self, ratio: float) -> None:
        T, half = self.args.tokens, self.half()
        t0 = time.perf_counter()
        mp, learned, info = self.maskprune(ratio, T)
        self.add("maskprune", ratio, learned, self.ppl(mp, "maskprune"), info.pop("train_tokens"),
                 time.perf_counter() - t0, **info)
        del mp
        t0 = time.perf_counter()
        mp, learned_half, info = self.maskprune(ratio, half, rec_tokens=T - half)
        self.add("maskprune + recovery", ratio, learned_half, self.ppl(mp, "maskprune + recovery"),
                 info.pop("train_tokens"), time.perf_counter() - t0, **info)
        del mp
        fixed = balanced_target(self.d, ratio)
        rec_changed = changed(self.rec_cfg(T), RecoveryConfig())
        for method in METHODS:
            pruned = materialize(self.model, select(self.scores[method], fixed))
            assert param_count(pruned) == describe(self.d, fixed)["total_params"]
            self.add(method, ratio, fixed, self.ppl(pruned, method), 0, 0.0, split="fixed rule")
            t0 = time.perf_counter()
            rec = self.recovered(pruned, T, self.model)
            self.add(f"{method} + recovery", ratio, fixed, self.ppl(rec, f"{method} + recovery"), T,
                     time.perf_counter() - t0, split="fixed rule", recovery_config=rec_changed)
            if learned != fixed:
                at = materialize(self.model, select(self.scores[method], learned))
                self.add(method, ratio, learned, self.ppl(at, f"{method} @ learned"), 0, 0.0,
                         split="MaskPrune's learned target")
                if method != "magnitude":  # the same recovery at MaskPrune's shape: what selection adds
                    t0 = time.perf_counter()
                    rec = self.recovered(at, T, self.model)
                    self.add(f"{method} + recovery", ratio, learned, self.ppl(rec, f"{method} @ learned + rec"),
                             T, time.perf_counter() - t0, split="MaskPrune's learned target",
                             recovery_config=rec_changed)
                    # the same cut with the compensation MaskPrune runs with (mptool.compensate)
                    comp = self.cut(method, learned, compensated=True)
                    self.add(f"{method} + compensation", ratio, learned, self.ppl(comp, f"{method} @ learned, comp"),
                             0, 0.0, split="MaskPrune's learned target")
                    t0 = time.perf_counter()
                    rec = self.recovered(comp, T, self.model)
                    self.add(f"{method} + compensation + recovery", ratio, learned,
                             self.ppl(rec, f"{method} @ learned, comp + rec"), T, time.perf_counter() - t0,
                             split="MaskPrune's learned target", recovery_config=rec_changed)

    def ablations(self, ratio: float) -> None:
        T, half = self.args.tokens, self.half()
        t0 = time.perf_counter()
        mp, target, info = self.maskprune(ratio, half, rec_tokens=T - half, fixed_multiplier=0.5)
        self.add("ablation: fixed multipliers (y=0.5) + recovery", ratio, target,
                 self.ppl(mp, "fixed multipliers"), info.pop("train_tokens"), time.perf_counter() - t0, **info)
        t0 = time.perf_counter()
        mp, target, info = self.maskprune(ratio, half, rec_tokens=T - half, dual="exact")
        self.add("ablation: dual ascent with exact line search + recovery", ratio, target,
                 self.ppl(mp, "exact multipliers"), info.pop("train_tokens"), time.perf_counter() - t0, **info)
        t0 = time.perf_counter()
        mp, target, info = self.maskprune(ratio, half, rec_tokens=T - half, rec_kw={"kd": False}, kd_distill=False)
        self.add("ablation: LoRA only (LM loss, no distillation)", ratio, target,
                 self.ppl(mp, "LoRA only"), info.pop("train_tokens"), time.perf_counter() - t0, **info)

    def save(self) -> dict | None:
        if not self.table:
            return None
        a = self.args
        host = host_info()
        result = {
            "benchmark": "quality",
            "command": f"python -m mptool.benchmarks.quality --ratios {a.ratios} --tokens {a.tokens} "
                       f"--seq-len {a.seq_len} --batch-size {a.batch_size} --eval-tokens {a.eval_tokens} "
                       f"--calib-tokens {a.calib_tokens}" + (" --ablations" if a.ablations else "")
                       + (f" --device {a.device}" if a.device != "cpu" else "")
                       + f" --data-order {a.data_order}",
            "model": a.model or "embedded:SmolLM2-135M-Instruct",
            "protocol": dataclasses.asdict(self.protocol),
            "training": {"text": "austen: 5 training novels", "tokens_per_method": a.tokens,
                         "seq_len": a.seq_len, "batch_size": a.batch_size, "calib_tokens": a.calib_tokens,
                         "order": a.data_order,
                         # the defaults; each trained row records what it ran differently
                         # (maskprune_config / recovery_config: the fields that differ)
                         "maskprune": dataclasses.asdict(MaskPruneConfig()),
                         "recovery": dataclasses.asdict(RecoveryConfig())},
            "rows": self.rows,
            "wall_s": round(time.perf_counter() - self.started, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                            "device": str(self.dev),
                            "gpu": torch.cuda.get_device_name(0) if self.dev.type == "cuda" else None,
                            "python": platform.python_version(), "machine": platform.machine(),
                            # the CPU model and kernel level: rows of badly damaged models recovered
                            # on another CPU differ by several percent (float rounding, then chaos)
                            "cpu": host["cpu"], "cpu_capability": host.get("cpu_capability")},
        }
        write_results(Path(a.out), result, markdown(result))
        return result


def markdown(result: dict) -> str:
    t = result["training"]
    lines = [
        f"Held-out perplexity on {result['protocol']['text']} ({result['protocol']['max_tokens']} tokens, "
        f"window {result['protocol']['window']}). Every trained method: {t['tokens_per_method']} training "
        f"tokens in all (batch {t['batch_size']} x {t['seq_len']}, {t.get('order', 'sequential')} blocks of the "
        f"training text). Wall time of the whole table: "
        f"{result['wall_s'] / 60:.0f} min on " + (result["environment"].get("gpu") or
                                                   f"{result['environment']['threads']} CPU threads") + ".",
        "",
        "| method | removed | KV heads | heads/group | FFN | params | ppl | × dense | train tokens | time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        name = r["method"] + (" (learned target)" if r.get("split") == "MaskPrune's learned target" else "")
        lines.append(
            f"| {name} | {1 - r['prunable_kept']:.1%} | {r['kv_heads']} | {r['heads_per_group']} | {r['ffn']} | "
            f"{r['total_params'] / 1e6:.1f} M | {r['ppl']:.2f} | {r['ppl_x_dense']:.2f} | {r['train_tokens']} | "
            f"{r['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def changed(cfg: Any, default: Any) -> dict[str, Any]:
    """The fields of ``cfg`` that differ from ``default``: what a row ran, next to the defaults the
    table records once."""
    ours, base = dataclasses.asdict(cfg), dataclasses.asdict(default)
    return {k: v for k, v in ours.items() if base[k] != v}


def add_data_order(ap: argparse.ArgumentParser) -> None:
    """``--data-order``, defaulting to ``mptool compress``'s (``data.order``)."""
    ap.add_argument("--data-order", default=DataConfig().order, choices=list(DATA_ORDERS),
                    help=f"training/calibration blocks: drawn from the whole text (shuffled) or the text's "
                         f"first tokens (sequential); default {DataConfig().order}, as mptool compress")


def recorded_command(module: str, argv: list[str] | None, args: argparse.Namespace) -> str:
    """The command line that reproduces a run of ``module``: its arguments (``sys.argv`` when
    ``argv`` is None) with ``--data-order`` stated even where the default was taken."""
    given = list(sys.argv[1:] if argv is None else argv)
    stated = any(a.split("=")[0] == "--data-order" for a in given)
    return " ".join([f"python -m {module}", *given, *([] if stated else ["--data-order", args.data_order])])


def budget_problem(args: argparse.Namespace) -> str | None:
    """Why ``--tokens`` cannot be split fairly, or None: every trained row must train on exactly
    ``--tokens``, so it is a whole number of steps of ``--batch-size`` x ``--seq-len``, and at least
    two (MaskPrune + recovery gives half to each phase)."""
    step_tokens = args.batch_size * args.seq_len
    if args.batch_size < 1 or args.seq_len < 1:
        return f"--batch-size and --seq-len must be positive, got {args.batch_size} and {args.seq_len}"
    if args.tokens < 2 * step_tokens or args.tokens % step_tokens:
        lower = max(2, args.tokens // step_tokens) * step_tokens
        return (f"--tokens must be a multiple of --batch-size x --seq-len = {step_tokens}, at least "
                f"{2 * step_tokens} (two steps), got {args.tokens}; e.g. {lower}")
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--tokens", type=int, default=32768,
                    help="training tokens per trained method (default: the README table's 32 k)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens (default: the README table's)")
    ap.add_argument("--ablations", action="store_true")
    add_data_order(ap)
    ap.add_argument("--device", default="cpu", choices=list(D.DEVICES),
                    help="cpu (default: the committed table) | cuda | auto")
    ap.add_argument("--tag", default="smollm2")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    problem = budget_problem(args)
    if problem:
        ap.error(problem)
    args.out = args.out or str(RESULTS / f"quality_{args.tag}")
    torch.manual_seed(0)
    bench = Bench(args)
    ratios = [float(r) for r in args.ratios.split(",")]
    bench.dense_reference()
    for ratio in ratios:
        bench.run_ratio(ratio)
    if args.ablations:
        bench.ablations(max(ratios))
    if result := bench.save():
        console.print(markdown(result))


if __name__ == "__main__":
    main()
