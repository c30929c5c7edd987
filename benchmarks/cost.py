"""Cost of mask learning against plain LoRA + distillation on the dense model, in one run.

    python -m mptool.benchmarks.cost --steps 8

Each mode runs in its own subprocess (so peak memory is its own): ``mask`` is MaskPrune mask
learning as compress runs it by default (masks initialised from flap, multipliers, LoRA, KD against
the adapter-disabled teacher, compensation of the pruned units from the Gram matrices of a
calibration pass over the same blocks, not timed); ``mask-plain`` the same without compensation
(both used to start from masks at 1, where ties make the kept set change every step and
compensation would recompute every layer's delta every step); ``lora`` is the same
LoRA + KD (+ the LM term, as configured) loop on the dense model with no masks. Reports median step time and peak RSS of each
and their ratios; writes ``benchmarks/results/cost_<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from mptool.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def child(mode: str, steps: int, seq_len: int, batch: int, model_spec: str | None) -> dict:
    import torch

    from mptool.data import default_texts, token_blocks
    from mptool.maskprune import MaskPrune, MaskPruneConfig, autocast, kd_loss, lm_loss
    from mptool.models import load_model
    from mptool.shapes import Dims, prunable_params

    model, tok = load_model(model_spec)
    d = Dims.from_config(model.config)
    blocks = token_blocks(tok, [default_texts()[0]], seq_len, seq_len * batch * (steps + 1))
    cfg = MaskPruneConfig(steps=steps + 1, batch_size=batch, checkpoint_every=0)
    times = []
    if mode in ("mask", "mask-plain"):
        from mptool.baselines import calibrate, score
        from mptool.compensate import grams_of

        # as compress: one calibration pass for the default (flap) initialisation and, by
        # default, the Gram matrices of compensation (not timed; its memory is in the peak)
        o_stats, d_stats = calibrate(model, blocks, gram=mode == "mask")
        init = score(model, cfg.init, o_stats, d_stats)
        grams = grams_of(o_stats, d_stats) if mode == "mask" else None
        del o_stats, d_stats
        trainer = MaskPrune(model, blocks, cfg, budget=0.5 * prunable_params(d, d.dense_target()), grams=grams,
                            init_scores=init)
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            trainer.step()
            times.append(time.perf_counter() - t0)
    else:
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        peft_model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"]))
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=cfg.lr_lora)
        for i in range(steps + 1):
            ids = blocks[i * batch:(i + 1) * batch]
            t0 = time.perf_counter()
            with torch.no_grad(), peft_model.disable_adapter(), autocast(cfg.bf16):
                teacher = peft_model(ids).logits
            with autocast(cfg.bf16):
                logits = peft_model(ids).logits
            # the same loss as mask learning: KD (chunked as there) + the weighted next-token term
            loss = kd_loss(logits, teacher, cfg.temperature, cfg.kd_chunk) + cfg.lm_weight * lm_loss(logits, ids)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    steady = sorted(times[1:])  # the first step pays one-off costs
    return {"mode": mode, "step_s_median": steady[len(steady) // 2], "step_s_min": steady[0],
            "step_s_max": steady[-1], "steps": steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--tag", default="smollm2")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.seq_len, args.batch_size, args.model)))
        return {}
    runs = {}
    for mode in ("lora", "mask", "mask-plain"):
        cmd = [sys.executable, "-m", "mptool.benchmarks.cost", "--child", mode, "--steps", str(args.steps),
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
        if args.model:
            cmd += ["--model", args.model]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs[mode] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(runs[mode]), file=sys.stderr)
    result = {
        "benchmark": "cost",
        "command": f"python -m mptool.benchmarks.cost --steps {args.steps} --seq-len {args.seq_len} "
                   f"--batch-size {args.batch_size}",
        "model": args.model or "embedded:SmolLM2-135M-Instruct",
        "tokens_per_step": args.seq_len * args.batch_size,
        "runs": runs,
        "step_time_ratio": runs["mask"]["step_s_median"] / runs["lora"]["step_s_median"],
        "peak_memory_ratio": runs["mask"]["peak_rss_mb"] / runs["lora"]["peak_rss_mb"],
        "step_time_ratio_without_compensation": runs["mask-plain"]["step_s_median"] / runs["lora"]["step_s_median"],
        "peak_memory_ratio_without_compensation": runs["mask-plain"]["peak_rss_mb"] / runs["lora"]["peak_rss_mb"],
        "environment": {"python": platform.python_version(), "machine": platform.machine()},
    }
    write_json(RESULTS / f"cost_{args.tag}.json", result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
