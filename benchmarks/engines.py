"""Engine runners: generate ``N`` tokens for a batch of prompts and time prefill and decode.

Every runner answers :meth:`Runner.generate` with a :class:`Sample`: time to first token (the
whole batch's prefill, up to the first new token of every sequence), decode seconds per step
(one new token for every sequence) and the request's wall time. Greedy decoding, end-of-sequence
ignored, so every run makes exactly ``N`` tokens per sequence.

* ``torch`` — transformers in eager PyTorch: one prefill forward (LM head on the last position),
  then ``N - 1`` single-token forwards on the KV cache, timed separately.
* ``onnxruntime`` — the onnxruntime-genai model builder's graph (built once into a cache, with
  the LM head pruned to the last position in prefill), driven through ``og.Generator``.
* ``vllm`` — ``vllm.LLM`` in its own subprocess per model (vLLM owns the process: thread binding,
  compile caches, memory). Prefill and decode come from vLLM's per-request timestamps (the same
  TTFT/TPOT its serving benchmarks report), the wall time from the ``generate`` call.

Run as ``python -m mptool.benchmarks.engines JOB.json RESULT.json`` it is the vLLM child process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mptool.errors import MptoolError

PROGRESS_PREFIX = "mptool-bench-run "
"""Line prefix the vLLM child prints on stdout after each run (the parent advances its bar)."""

DEFAULT_DTYPE = {"torch": "float32", "onnxruntime": "float32", "vllm": "bfloat16"}
ACCEPTED_DTYPES = {
    "torch": ("float32", "bfloat16", "float16"),
    "onnxruntime": ("float32", "float16", "bfloat16"),
    "vllm": ("float32", "bfloat16", "float16"),
}
_ORT_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclass
class Sample:
    """The timings of one generate call."""

    ttft_s: float
    """Seconds from the request to the first new token of every sequence (prefill)."""
    tpot_s: float
    """Seconds per decode step (one output token of every sequence), steady state."""
    total_s: float
    """Wall seconds of the whole request (prefill + ``N - 1`` decode steps + overheads)."""


@dataclass
class EngineSpec:
    """How one engine runs, resolved from :class:`~mptool.benchmarks.config.BenchConfig`."""

    engine: str
    dtype: str
    device: str
    threads: int
    cpus: list[int]
    """CPU ids this process may use (the first ``threads`` are bound, where the engine binds)."""
    eager: bool = False
    kv_cache_gib: int = 2
    gpu_memory_utilization: float = 0.5
    cache_dir: str = ""
    trust_remote_code: bool = False
    max_batch: int = 1
    max_len: int = 1
    """Longest prompt + new tokens of the sweep (engines size their caches from it)."""
    max_batched_tokens: int = 1
    """Largest batch x prompt of the sweep (vLLM prefills a whole batch in one step)."""


@dataclass
class Cell:
    """One point of the sweep."""

    batch_size: int
    prompt_len: int

    @property
    def label(self) -> str:
        return f"b{self.batch_size} p{self.prompt_len}"


def make_prompts(vocab_size: int, cell: Cell, seed: int) -> np.ndarray:
    """Random prompt token ids, ``[batch, prompt_len]``; the same for every model and engine.

    Ids are drawn above the first quarter of the vocabulary (capped at 1000) to stay clear of
    special tokens; every sequence differs, so no engine can share a prefix between them.
    """
    rng = np.random.default_rng([seed, cell.batch_size, cell.prompt_len])
    low = min(1000, vocab_size // 4)
    return rng.integers(low, vocab_size, size=(cell.batch_size, cell.prompt_len), dtype=np.int64)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def cpu_list(cpus: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (the form ``VLLM_CPU_OMP_THREADS_BIND`` takes)."""
    parts, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            parts.append(f"{start}-{c}" if c != start else str(c))
            start = None
    return ",".join(parts)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------- the runners


class Runner:
    """One model loaded in one engine."""

    spec: EngineSpec

    def info(self) -> dict[str, Any]:
        """The engine's environment: versions, dtype, device, threads, mode."""
        raise NotImplementedError

    def generate(self, prompts: np.ndarray, new_tokens: int) -> Sample:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TorchRunner(Runner):
    """transformers' model in eager PyTorch, prefill and decode timed apart."""

    def __init__(self, model_dir: str, spec: EngineSpec):
        import torch
        from transformers import AutoModelForCausalLM

        self.spec = spec
        torch.set_num_threads(spec.threads)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, spec.dtype), use_safetensors=True,
            trust_remote_code=spec.trust_remote_code,
        ).to(spec.device).eval()

    def info(self) -> dict[str, Any]:
        import torch
        import transformers

        return {
            "engine": "torch", "versions": {"torch": torch.__version__,
                                            "transformers": transformers.__version__},
            "dtype": self.spec.dtype, "device": self.spec.device,
            "threads": torch.get_num_threads(), "mode": "eager",
            "notes": "transformers forward per token with its DynamicCache; prefill computes the "
                     "LM head on the last position only (logits_to_keep=1)",
        }

    def _sync(self) -> None:
        import torch

        if self.spec.device.startswith("cuda"):
            torch.cuda.synchronize()

    def generate(self, prompts: np.ndarray, new_tokens: int) -> Sample:
        import torch

        ids = torch.from_numpy(prompts).to(self.spec.device)
        with torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            self._sync()
            t1 = time.perf_counter()
            past = out.past_key_values
            for _ in range(new_tokens - 1):
                out = self.model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            self._sync()
            t2 = time.perf_counter()
        return Sample(ttft_s=t1 - t0, tpot_s=(t2 - t1) / (new_tokens - 1), total_s=t2 - t0)


def _fingerprint(model_dir: Path, *extra: str) -> str:
    """A key of a model folder's config and weights (names, sizes, mtimes) plus ``extra``."""
    h = hashlib.sha256(str(model_dir.resolve()).encode())
    for p in sorted(model_dir.iterdir()):
        if p.is_file() and (p.suffix in (".json", ".safetensors", ".model") or p.name.startswith("tokenizer")):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()[:16]


def build_onnx(model_dir: str, spec: EngineSpec, log: Callable[[str], None] | None = None) -> Path:
    """Build (or reuse from the cache) the onnxruntime-genai model of a folder.

    Runs ``python -m onnxruntime_genai.models.builder -i DIR -o OUT -p fp32 -e cpu`` with the LM
    head pruned to the last position in prefill (``prune_lm_head=true``: what serving needs).
    """
    src = Path(model_dir)
    ep = "cuda" if spec.device.startswith("cuda") else "cpu"
    precision = _ORT_PRECISION[spec.dtype]
    key = _fingerprint(src, precision, ep, _version("onnxruntime-genai") or "")
    out = Path(spec.cache_dir).expanduser() / "onnxruntime" / f"{src.name}-{precision}-{ep}-{key}"
    if (out / "genai_config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(tmp / "model"),
           "-p", precision, "-e", ep, "-c", str(tmp / "hf-cache"), "--extra_options", "prune_lm_head=true"]
    if log:
        log(f"building the onnxruntime-genai model of {src} ({precision}, {ep})")
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (tmp / "model" / "genai_config.json").is_file():
        (tmp / "build.log").write_text(proc.stdout + proc.stderr)
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise MptoolError(f"onnxruntime-genai's builder failed on {src}: "
                          f"{lines[-1].strip() if lines else 'no output'} (log: {tmp / 'build.log'})")
    os.replace(tmp / "model", out)
    subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return out


class OrtRunner(Runner):
    """onnxruntime-genai: prefill = ``append_tokens`` + the first token, decode = the rest."""

    def __init__(self, model_dir: str, spec: EngineSpec):
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        import onnxruntime_genai as og

        self.og, self.spec = og, spec
        self.path = build_onnx(model_dir, spec)
        config = og.Config(str(self.path))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": spec.threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)

    def info(self) -> dict[str, Any]:
        import onnxruntime

        return {
            "engine": "onnxruntime",
            "versions": {"onnxruntime": onnxruntime.__version__,
                         "onnxruntime-genai": self.og.__version__},
            "dtype": self.spec.dtype, "device": self.spec.device, "threads": self.spec.threads,
            "mode": "graph (ONNX Runtime, all optimisations)", "model_path": str(self.path),
            "notes": "onnxruntime-genai model builder with prune_lm_head=true; "
                     "og.Generator with a KV buffer shared across steps",
        }

    def generate(self, prompts: np.ndarray, new_tokens: int) -> Sample:
        og = self.og
        batch, prompt_len = prompts.shape
        params = og.GeneratorParams(self.model)
        # min_length = max_length keeps end-of-sequence out: exactly N tokens per sequence.
        params.set_search_options(batch_size=batch, max_length=prompt_len + new_tokens,
                                  min_length=prompt_len + new_tokens, do_sample=False)
        t0 = time.perf_counter()
        generator = og.Generator(self.model, params)
        generator.append_tokens(prompts.astype(np.int32))
        generator.generate_next_token()
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            generator.generate_next_token()
        t2 = time.perf_counter()
        del generator
        return Sample(ttft_s=t1 - t0, tpot_s=(t2 - t1) / (new_tokens - 1), total_s=t2 - t0)


def vllm_env(spec: EngineSpec) -> dict[str, str]:
    """The environment a vLLM child runs under (CPU: thread binding and KV-cache size)."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in-process: a batch enters whole
           "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if spec.device == "cpu":
        env.update({
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
                                         or cpu_list(spec.cpus[:spec.threads]),
            "VLLM_CPU_KVCACHE_SPACE": str(spec.kv_cache_gib),
            "OMP_NUM_THREADS": str(spec.threads),
        })
    return env


class VllmRunner(Runner):
    """``vllm.LLM`` in this process: only ever built inside the child of :func:`measure`."""

    def __init__(self, model_dir: str, spec: EngineSpec):
        from vllm import LLM

        self.spec = spec
        kwargs: dict[str, Any] = dict(
            model=model_dir, dtype=spec.dtype, enforce_eager=spec.eager, seed=0,
            max_model_len=spec.max_len, max_num_seqs=spec.max_batch,
            max_num_batched_tokens=max(spec.max_batched_tokens, spec.max_len),
            enable_prefix_caching=False,  # the same prompts repeat: no run may reuse another's KV
            disable_log_stats=False,  # per-request timestamps (TTFT, decode)
            skip_tokenizer_init=True, trust_remote_code=spec.trust_remote_code,
        )
        if spec.device != "cpu":
            kwargs["gpu_memory_utilization"] = spec.gpu_memory_utilization
        started = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.startup_s = time.perf_counter() - started

    def info(self) -> dict[str, Any]:
        import torch
        import vllm

        compilation = self.llm.llm_engine.vllm_config.compilation_config
        mode = getattr(compilation, "mode", None)
        mode_name = getattr(mode, "name", str(mode))
        return {
            "engine": "vllm",
            "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
            "dtype": self.spec.dtype, "device": self.spec.device, "threads": self.spec.threads,
            "mode": "eager" if self.spec.eager else f"compiled ({mode_name}, {compilation.backend or 'default'} backend)",
            "startup_s": round(self.startup_s, 1),
            "env": {k: v for k, v in vllm_env(self.spec).items() if k.startswith(("VLLM", "OMP"))},
            "notes": "vllm.LLM offline, greedy, ignore_eos, prefix caching off, whole batch "
                     "prefilled in one step; TTFT and decode from vLLM's request timestamps",
        }

    def generate(self, prompts: np.ndarray, new_tokens: int) -> Sample:
        from vllm import SamplingParams

        requests = [{"prompt_token_ids": row.tolist()} for row in prompts]
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        total = time.perf_counter() - t0
        counts = {len(o.outputs[0].token_ids) for o in outputs}
        if counts != {new_tokens}:
            raise RuntimeError(f"vLLM generated {sorted(counts)} tokens per sequence, asked {new_tokens}")
        stats = [o.metrics for o in outputs]
        if all(s is not None and getattr(s, "first_token_ts", 0) > 0 for s in stats):
            start = min(s.queued_ts for s in stats)
            ttft = max(s.first_token_ts for s in stats) - start
            tpot = _median([(s.last_token_ts - s.first_token_ts) / (new_tokens - 1) for s in stats])
            return Sample(ttft_s=ttft, tpot_s=tpot, total_s=total)
        # No request timestamps in this vLLM: time a 1-token request, decode from the difference.
        t0 = time.perf_counter()
        self.llm.generate(requests, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True,
                                                   detokenize=False), use_tqdm=False)
        ttft = time.perf_counter() - t0
        return Sample(ttft_s=ttft, tpot_s=(total - ttft) / (new_tokens - 1), total_s=total)


RUNNERS: dict[str, type[Runner]] = {"torch": TorchRunner, "onnxruntime": OrtRunner, "vllm": VllmRunner}


# ---------------------------------------------------------------- one model's sweep


@dataclass
class ModelRuns:
    """Everything one engine measured on one model."""

    info: dict[str, Any]
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    """Timed samples per cell label (``"b8 p128"``)."""


def sweep_model(runner: Runner, cells: list[Cell], vocab_size: int, new_tokens: int, warmup: int,
                repeats: int, seed: int, on_run: Callable[[str], None]) -> ModelRuns:
    """Warm up and time every cell on one loaded model; ``on_run(label)`` after each run."""
    runs = ModelRuns(info=runner.info())
    for cell in cells:
        prompts = make_prompts(vocab_size, cell, seed)
        for _ in range(warmup):
            runner.generate(prompts, new_tokens)
            on_run(cell.label)
        samples = []
        for _ in range(repeats):
            samples.append(runner.generate(prompts, new_tokens))
            on_run(cell.label)
        runs.samples[cell.label] = samples
    return runs


def measure(engine: str, model_dir: str, spec: EngineSpec, cells: list[Cell], vocab_size: int,
            new_tokens: int, warmup: int, repeats: int, seed: int,
            on_run: Callable[[str], None]) -> ModelRuns:
    """Load ``model_dir`` in ``engine`` and run the sweep (vLLM: in a child process)."""
    if engine == "vllm":
        return _measure_in_child(model_dir, spec, cells, vocab_size, new_tokens, warmup, repeats,
                                 seed, on_run)
    runner = RUNNERS[engine](model_dir, spec)
    try:
        return sweep_model(runner, cells, vocab_size, new_tokens, warmup, repeats, seed, on_run)
    finally:
        runner.close()


def _measure_in_child(model_dir: str, spec: EngineSpec, cells: list[Cell], vocab_size: int,
                      new_tokens: int, warmup: int, repeats: int, seed: int,
                      on_run: Callable[[str], None]) -> ModelRuns:
    with tempfile.TemporaryDirectory(prefix="mptool-bench-") as tmp:
        job, result, log_path = Path(tmp) / "job.json", Path(tmp) / "result.json", Path(tmp) / "vllm.log"
        job.write_text(json.dumps({
            "model_dir": model_dir, "spec": asdict(spec), "cells": [asdict(c) for c in cells],
            "vocab_size": vocab_size, "new_tokens": new_tokens, "warmup": warmup,
            "repeats": repeats, "seed": seed,
        }))
        env = {**os.environ, **vllm_env(spec)}
        with open(log_path, "w") as log, subprocess.Popen(
            [sys.executable, "-m", "mptool.benchmarks.engines", str(job), str(result)],
            stdout=subprocess.PIPE, stderr=log, text=True, env=env,
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(PROGRESS_PREFIX):
                    on_run(line[len(PROGRESS_PREFIX):].strip())
            code = proc.wait()
        if code != 0 or not result.is_file():
            text = log_path.read_text(errors="replace")
            kept = Path(tempfile.gettempdir()) / f"mptool-bench-vllm-{os.getpid()}.log"
            kept.write_text(text)
            raise MptoolError(f"vLLM failed on {model_dir}: {_last_error(text)} (full log: {kept})")
        data = json.loads(result.read_text())
    return ModelRuns(info=data["info"],
                     samples={k: [Sample(**s) for s in v] for k, v in data["samples"].items()})


def _last_error(log: str) -> str:
    """The most telling line of a failed child's log: the last exception line, else the last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln.split(":")[0] or ln.startswith(("ValueError", "RuntimeError", "AssertionError")):
            return ln[:400]
    return lines[-1][:400] if lines else "no output"


def _child(job_path: str, result_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    spec = EngineSpec(**job["spec"])
    runner = VllmRunner(job["model_dir"], spec)

    def on_run(label: str) -> None:
        print(PROGRESS_PREFIX + label, flush=True)

    runs = sweep_model(runner, [Cell(**c) for c in job["cells"]], job["vocab_size"], job["new_tokens"],
                       job["warmup"], job["repeats"], job["seed"], on_run)
    Path(result_path).write_text(json.dumps(
        {"info": runs.info, "samples": {k: [asdict(s) for s in v] for k, v in runs.samples.items()}}))
    # vLLM's shutdown can hang on CPU; the result is written, leave at once.
    sys.stdout.flush()
    os._exit(0)


def host_info() -> dict[str, Any]:
    """The host every engine shares: Python, OS, CPU, cores, load."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "mptool": _version("mptool"),
    }
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
