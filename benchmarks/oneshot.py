"""One-shot quality table: held-out perplexity of dense vs magnitude / wanda-sp / flap.

    python -m mptool.benchmarks.oneshot --ratios 0.25,0.5

The model is loaded and calibrated once; every method at a ratio prunes to the same uniform
target (the fixed "same fraction of attention and FFN" split, :func:`balanced_target`), so the
methods differ only in *which* units they keep. Writes JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mptool.baselines import METHODS, calibrate, score, select
from mptool.benchmarks.quality import add_data_order, recorded_command
from mptool.compress import eval_text_for, param_count
from mptool.data import default_texts, eval_token_stream, token_blocks
from mptool.evaluate import PplProtocol, perplexity
from mptool.io import write_results
from mptool.models import load_model
from mptool.progress import console, step
from mptool.shapes import Dims, balanced_target, describe
from mptool.surgery import materialize

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: embedded SmolLM2-135M)")
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    add_data_order(ap)
    ap.add_argument("--out", default=str(RESULTS / "oneshot_quality"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()

    model, tok = load_model(args.model)
    d = Dims.from_config(model.config)
    text, name = eval_text_for(None)
    protocol = PplProtocol(max_tokens=args.eval_tokens, text=name)
    ids = eval_token_stream(tok, text, args.eval_tokens)
    blocks = token_blocks(tok, [default_texts()[0]], args.seq_len, args.calib_tokens, order=args.data_order)

    def ppl(m, label):
        with step(f"ppl {label}", total=ids.numel()) as adv:
            return perplexity(m, ids, protocol, progress=adv)["ppl"]

    dense_ppl = ppl(model, "dense")
    with step("calibrate", total=len(blocks)) as adv:
        o_stats, d_stats = calibrate(model, blocks, progress=adv)
    scores = {m: score(model, m, o_stats, d_stats) for m in METHODS}
    rows = [{"method": "dense", "ratio": 0.0, **describe(d, d.dense_target()), "ppl": dense_ppl}]
    for ratio in [float(r) for r in args.ratios.split(",")]:
        target = balanced_target(d, ratio)
        for method in METHODS:
            pruned = materialize(model, select(scores[method], target))
            assert param_count(pruned) == describe(d, target)["total_params"]
            rows.append({"method": method, "ratio": ratio, **describe(d, target),
                         "ppl": ppl(pruned, f"{method} @ {ratio}")})
    result = {
        "benchmark": "oneshot_quality",
        "command": recorded_command("mptool.benchmarks.oneshot", argv, args),
        "model": args.model or "embedded:SmolLM2-135M-Instruct",
        "protocol": protocol.__dict__,
        "calibration": {"text": "austen:train (5 novels)", "tokens": int(blocks.numel()),
                        "seq_len": args.seq_len, "order": args.data_order},
        "rows": rows,
        "wall_s": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
    }
    table = markdown(result)
    write_results(Path(args.out), result, table)
    console.print(table)
    return result


def markdown(result: dict) -> str:
    dense = result["rows"][0]["ppl"]
    lines = [
        f"Held-out perplexity, {result['protocol']['text']}, {result['protocol']['max_tokens']} tokens, "
        f"window {result['protocol']['window']} / stride {result['protocol']['stride']}; "
        f"calibration {result['calibration']['tokens']} tokens of the training novels "
        f"({result['calibration'].get('order', 'sequential')} blocks).",
        "",
        "| method | removed (of prunable) | KV heads | heads/group | FFN | params | perplexity | × dense |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        removed = f"{1 - r['prunable_kept']:.1%}"
        lines.append(f"| {r['method']} | {removed} | {r['kv_heads']} | {r['heads_per_group']} | {r['ffn']} | "
                     f"{r['total_params'] / 1e6:.1f} M | {r['ppl']:.2f} | {r['ppl'] / dense:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
