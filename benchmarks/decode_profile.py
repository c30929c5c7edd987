"""Where a decode step's time goes, dense vs pruned: the profile behind bench_profile_*.json.

    python -m mptool.benchmarks.decode_profile DENSE PRUNED --batch 8 --prompt 128 --out benchmarks/results/bench_profile_smollm2_cpu

Two views of one decode step (batch B, prompt P, 32 new tokens):

* **GEMM-only estimate** — the step's matmuls alone (q/k/v, o, gate/up, down of every layer and
  the LM head) as back-to-back ``torch.nn.functional.linear`` calls on random weights of the
  model's shapes, in fp32 and bf16, on the same threads. What an engine that did nothing but its
  matmuls would need; the gap to the measured step is everything else.
* **ONNX Runtime op profile** — the onnxruntime-genai graph with ``enable_profiling``: time per
  operator kind (MatMul of the layers, the LM head MatMul, GroupQueryAttention, norms, rest) per
  decode step, and the time outside ``session.Run`` (og's search/sampling and Python).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from mptool.io import write_results


def dims(folder: str):
    from transformers import AutoConfig

    from mptool.shapes import Dims

    return Dims.from_config(AutoConfig.from_pretrained(folder))


def gemm_step_s(d, batch: int, dtype: torch.dtype, threads: int, reps: int = 15) -> dict:
    """Median seconds of one decode step's matmuls (layers, LM head) on random weights."""
    torch.set_num_threads(threads)
    h, hd = d.hidden_size, d.head_dim
    layers = [[torch.randn(o, i, dtype=dtype) for o, i in (
        ((d.num_heads + 2 * d.num_kv_heads) * hd, h), (h, d.num_heads * hd),
        (2 * d.intermediate_size, h), (h, d.intermediate_size))] for _ in range(d.num_layers)]
    head = torch.randn(d.vocab_size, h, dtype=dtype)
    x = torch.randn(batch, h, dtype=dtype)
    xi = torch.randn(batch, d.intermediate_size, dtype=dtype)
    xo = torch.randn(batch, d.num_heads * hd, dtype=dtype)

    def layers_only() -> None:
        for wqkv, wo, wgu, wd in layers:
            torch.nn.functional.linear(x, wqkv)
            torch.nn.functional.linear(xo, wo)
            torch.nn.functional.linear(x, wgu)
            torch.nn.functional.linear(xi, wd)

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    with torch.inference_mode():
        t_layers = timed(layers_only)
        t_head = timed(lambda: torch.nn.functional.linear(x, head))
    return {"layers_s": t_layers, "lm_head_s": t_head, "total_s": t_layers + t_head}


def _category(name: str, op: str) -> str:
    if "lm_head" in name:
        return "lm_head"
    if op in ("MatMul", "MatMulNBits", "Gemm"):
        return "layer matmuls"
    if op in ("GroupQueryAttention", "MultiHeadAttention", "Attention"):
        return "attention"
    if "LayerNorm" in op:
        return "norms"
    return "other ops"


def _ort_runs(folder: str, batch: int, prompt: int, new_tokens: int, threads: int, prefix: str) -> list[float]:
    """In a child process (onnxruntime writes its profile when the process ends): decode walls."""
    import onnxruntime_genai as og

    from mptool.benchmarks.engines import Cell, EngineSpec, build_onnx, make_prompts

    spec = EngineSpec(engine="onnxruntime", dtype="float32", device="cpu", threads=threads,
                      cpus=list(range(threads)),
                      cache_dir=str(Path("~/.cache/mptool/bench").expanduser()))
    config = og.Config(str(build_onnx(folder, spec)))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1, "enable_profiling": prefix}}}}))
    model = og.Model(config)
    prompts = make_prompts(dims(folder).vocab_size, Cell(batch, prompt), 0).astype(np.int32)
    walls = []
    for _ in range(3):  # the first run warms up; the profile is read for the last one
        params = og.GeneratorParams(model)
        params.set_search_options(batch_size=batch, max_length=prompt + new_tokens,
                                  min_length=prompt + new_tokens, do_sample=False)
        g = og.Generator(model, params)
        g.append_tokens(prompts)
        g.generate_next_token()
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            g.generate_next_token()
        walls.append((time.perf_counter() - t0) / (new_tokens - 1))
        del g
    return walls


def ort_profile(folder: str, batch: int, prompt: int, new_tokens: int, threads: int) -> dict:
    """Per decode step: wall time, time inside session.Run by operator category, the rest."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    tmp = tempfile.mkdtemp(prefix="ortprof-")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        walls = pool.submit(_ort_runs, folder, batch, prompt, new_tokens, threads,
                            os.path.join(tmp, "prof")).result()
    trace = json.loads(Path(sorted(glob.glob(os.path.join(tmp, "prof*.json")))[-1]).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    nodes = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    # The decode session runs of the last request are the last new_tokens - 1 model_runs.
    decode_runs = runs[-(new_tokens - 1):]
    lo, hi = decode_runs[0]["ts"], decode_runs[-1]["ts"] + decode_runs[-1]["dur"]
    per_cat: dict[str, float] = defaultdict(float)
    for e in nodes:
        if lo <= e["ts"] <= hi:
            per_cat[_category(e["name"], e.get("args", {}).get("op_name", ""))] += e["dur"] / 1e6
    steps = len(decode_runs)
    run_s = sum(r["dur"] for r in decode_runs) / 1e6 / steps
    out = {k: v / steps for k, v in sorted(per_cat.items())}
    out["inside session.Run, not in a kernel"] = run_s - sum(out.values())
    out["outside session.Run (og search, Python)"] = walls[-1] - run_s
    return {"step_wall_s": walls[-1], "session_run_s": run_s, "breakdown_s": out}


def _vllm_categories(events, vocab_size: int) -> dict[str, float]:
    """Self CPU seconds of a profile's ops by kind (LM head told apart by its vocab-sized shape)."""
    out: dict[str, float] = defaultdict(float)
    for e in events:
        name = e.key.lower()
        shapes = str(getattr(e, "input_shapes", ""))
        t = e.self_cpu_time_total / 1e6
        if any(k in name for k in ("linear", "mm", "matmul", "onednn", "mkldnn", "gemm")):
            out["lm_head" if str(vocab_size) in shapes else "layer matmuls"] += t
        elif any(k in name for k in ("attention", "attn", "paged", "flash", "sdpa")):
            out["attention"] += t
        elif any(k in name for k in ("sampl", "argmax", "topk", "sort", "softmax", "gumbel", "logits")):
            out["sampler / logits"] += t
        else:
            out["other ops"] += t
    return dict(out)


def _vllm_runs(folder: str, batch: int, prompt: int, new_tokens: int, threads: int) -> dict:
    """In a child process: vLLM (compiled) timed, then profiled with max_tokens=1 and =N."""
    from mptool.benchmarks.engines import Cell, EngineSpec, make_prompts, vllm_env

    spec = EngineSpec(engine="vllm", dtype="bfloat16", device="cpu", threads=threads,
                      cpus=sorted(os.sched_getaffinity(0)), max_batch=batch,
                      max_len=prompt + new_tokens, max_batched_tokens=batch * prompt)
    os.environ.update(vllm_env(spec))
    import torch.profiler as tp

    from mptool.benchmarks.engines import VllmRunner

    runner = VllmRunner(folder, spec)
    vocab = dims(folder).vocab_size
    prompts = make_prompts(vocab, Cell(batch, prompt), 0)
    for _ in range(2):
        runner.generate(prompts, new_tokens)
    tpot = statistics.median(runner.generate(prompts, new_tokens).tpot_s for _ in range(3))
    cats, walls = {}, {}
    for n in (1, new_tokens):
        runner.generate(prompts, max(n, 2))  # same shapes warm
        with tp.profile(activities=[tp.ProfilerActivity.CPU], record_shapes=True) as prof:
            t0 = time.perf_counter()
            if n == 1:
                from vllm import SamplingParams

                runner.llm.generate([{"prompt_token_ids": r.tolist()} for r in prompts],
                                    SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True,
                                                   detokenize=False), use_tqdm=False)
            else:
                runner.generate(prompts, n)
            walls[n] = time.perf_counter() - t0
        cats[n] = _vllm_categories(prof.key_averages(group_by_input_shape=True), vocab)
    steps = new_tokens - 1
    per_step = {k: (cats[new_tokens].get(k, 0.0) - cats[1].get(k, 0.0)) / steps
                for k in sorted(set(cats[1]) | set(cats[new_tokens]))}
    wall = (walls[new_tokens] - walls[1]) / steps
    per_step["not in an op (Python, scheduler, waits)"] = wall - sum(per_step.values())
    return {"tpot_s_unprofiled": tpot, "step_wall_s_profiled": wall, "breakdown_s": per_step}


def vllm_profile(folder: str, batch: int, prompt: int, new_tokens: int, threads: int) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_vllm_runs, folder, batch, prompt, new_tokens, threads).result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dense")
    ap.add_argument("pruned")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", default="benchmarks/results/bench_profile")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM profile (two engine starts)")
    args = ap.parse_args()
    doc: dict = {"command": "python -m mptool.benchmarks.decode_profile " + " ".join(
        f"{a}" for a in [args.dense, args.pruned, "--batch", args.batch, "--prompt", args.prompt,
                         "--out", args.out]), "batch": args.batch, "prompt": args.prompt,
                 "threads": args.threads, "gemm_only": {}, "onnxruntime": {}, "vllm": {}}
    for role, folder in (("dense", args.dense), ("pruned", args.pruned)):
        d = dims(folder)
        doc["gemm_only"][role] = {name: gemm_step_s(d, args.batch, dt, args.threads)
                                  for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
        doc["onnxruntime"][role] = ort_profile(folder, args.batch, args.prompt, args.new_tokens, args.threads)
        if not args.no_vllm:
            doc["vllm"][role] = vllm_profile(folder, args.batch, args.prompt, args.new_tokens, args.threads)
    lines = [f"# Decode step profile, batch {args.batch}, prompt {args.prompt}, {args.threads} threads", "",
             f"`{doc['command']}`", "", "## GEMM-only estimate (ms per decode step)", "",
             "| dtype | dense layers | dense LM head | dense total | pruned layers | pruned LM head | pruned total | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for dt in ("float32", "bfloat16"):
        dn, pr = doc["gemm_only"]["dense"][dt], doc["gemm_only"]["pruned"][dt]
        lines.append(f"| {dt} | {dn['layers_s'] * 1e3:.2f} | {dn['lm_head_s'] * 1e3:.2f} | {dn['total_s'] * 1e3:.2f} "
                     f"| {pr['layers_s'] * 1e3:.2f} | {pr['lm_head_s'] * 1e3:.2f} | {pr['total_s'] * 1e3:.2f} "
                     f"| {dn['total_s'] / pr['total_s']:.2f} |")
    lines += ["", "## onnxruntime (fp32) per decode step (ms)", "", "| part | dense | pruned | dense − pruned |",
              "|---|---:|---:|---:|"]
    dn, pr = doc["onnxruntime"]["dense"], doc["onnxruntime"]["pruned"]
    for k in dn["breakdown_s"]:
        a, b = dn["breakdown_s"][k], pr["breakdown_s"].get(k, 0.0)
        lines.append(f"| {k} | {a * 1e3:.2f} | {b * 1e3:.2f} | {(a - b) * 1e3:.2f} |")
    lines.append(f"| **step (wall)** | **{dn['step_wall_s'] * 1e3:.2f}** | **{pr['step_wall_s'] * 1e3:.2f}** "
                 f"| ratio {dn['step_wall_s'] / pr['step_wall_s']:.2f} |")
    if doc["vllm"]:
        dn, pr = doc["vllm"]["dense"], doc["vllm"]["pruned"]
        lines += ["", "## vLLM (bf16, compiled) per decode step under torch.profiler (ms)", "",
                  "Per step = (profile of an N-token request − profile of a 1-token request) ÷ (N − 1); "
                  "the profiler slows every op, so read shares, not absolute times.", "",
                  "| part | dense | pruned | dense − pruned |", "|---|---:|---:|---:|"]
        for k in dn["breakdown_s"]:
            a, b = dn["breakdown_s"][k], pr["breakdown_s"].get(k, 0.0)
            lines.append(f"| {k} | {a * 1e3:.2f} | {b * 1e3:.2f} | {(a - b) * 1e3:.2f} |")
        lines.append(f"| **step (profiled)** | **{dn['step_wall_s_profiled'] * 1e3:.2f}** | "
                     f"**{pr['step_wall_s_profiled'] * 1e3:.2f}** | ratio "
                     f"{dn['step_wall_s_profiled'] / pr['step_wall_s_profiled']:.2f} |")
        lines.append(f"| step without the profiler | {dn['tpot_s_unprofiled'] * 1e3:.2f} | "
                     f"{pr['tpot_s_unprofiled'] * 1e3:.2f} | ratio "
                     f"{dn['tpot_s_unprofiled'] / pr['tpot_s_unprofiled']:.2f} |")
    write_results(Path(args.out), doc, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
