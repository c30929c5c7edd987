"""Engine runners: generate ``N`` tokens for a batch of prompts and time prefill and decode.

Every runner answers :meth:`Runner.generate` with a :class:`Sample`: time to first token (the
whole batch's prefill, up to the first new token of every sequence), decode seconds per step
(one new token for every sequence) and the request's wall time. Greedy decoding, end-of-sequence
ignored, so every run makes exactly ``N`` tokens per sequence.

* ``torch`` — transformers in eager PyTorch: one prefill forward (LM head on the last position),
  then ``N - 1`` single-token forwards on the KV cache, timed separately.
* ``onnxruntime`` — the onnxruntime-genai model builder's graph (built once into a cache, with
  the LM head pruned to the last position in prefill), driven through ``og.Generator``.
* ``vllm`` — ``vllm.LLM`` in its own child process per model (vLLM owns the process: thread binding,
  compile caches, memory). Prefill and decode come from vLLM's per-request timestamps (the same
  TTFT/TPOT its serving benchmarks report), the wall time from the ``generate`` call.

Both models of a comparison stay loaded and take turns run by run (:func:`sweep_pair`). Run as
``python -m mptool.benchmarks.engines vllm`` this module is the vLLM child (:class:`ChildRunner`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import queue
import statistics
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from mptool import package_version
from mptool.errors import MptoolError
from mptool.io import cache_lock, kill_session, remove_vllm_shared_memory


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
    gpu_memory_utilization: float = 0.4
    cache_dir: str = ""
    trust_remote_code: bool = False
    max_batch: int = 1
    max_len: int = 1
    """Longest prompt + new tokens of the sweep (engines size their caches from it)."""
    max_batched_tokens: int = 1
    """Largest batch x prompt of the sweep (vLLM prefills a whole batch in one step)."""
    timeout_s: int = 1800
    """A child engine (vLLM) that does not answer a request (start-up included) within this many
    seconds is killed and the bench fails with its log, instead of hanging."""


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
    key = _fingerprint(src, precision, ep, package_version("onnxruntime-genai") or "")
    out = Path(spec.cache_dir).expanduser() / "onnxruntime" / f"{src.name}-{precision}-{ep}-{key}"
    if (out / "genai_config.json").is_file():
        return out
    with cache_lock(out):  # one build per entry; a killed build's leftovers are removed here
        if (out / "genai_config.json").is_file():  # another bench built it while we waited
            return out
        return _build_onnx(src, out, precision, ep, log)


def _build_onnx(src: Path, out: Path, precision: str, ep: str, log: Callable[[str], None] | None) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(tmp / "model"),
           "-p", precision, "-e", ep, "-c", str(tmp / "hf-cache"), "--extra_options", "prune_lm_head=true"]
    if log:
        log(f"building the onnxruntime-genai model of {src} ({precision}, {ep})")
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (tmp / "model" / "genai_config.json").is_file():
        (tmp / "build.log").write_text(proc.stdout + proc.stderr)
        for partial in (tmp / "model", tmp / "hf-cache"):  # keep the log, not a half-built model
            shutil.rmtree(partial, ignore_errors=True)
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


class ChildRunner(Runner):
    """A runner in its own Python process, driven line by line over stdin/stdout (vLLM).

    vLLM owns its process (thread binding, compile caches, memory, shutdown), so each model gets
    one; both stay up so the sweep can alternate dense and pruned runs like in-process engines.
    """

    def __init__(self, engine: str, model_dir: str, spec: EngineSpec, env: dict[str, str]):
        self.model_dir = model_dir
        self.failed = False
        self.log_path = Path(tempfile.mkstemp(prefix=f"mptool-bench-{engine}-", suffix=".log")[1])
        self._log = open(self.log_path, "w")
        self.timeout_s = spec.timeout_s
        # the child's TMPDIR: what the engine leaves there (vLLM's vllm_dist_* rendezvous files)
        # goes with this folder when the runner closes
        self._tmp = tempfile.TemporaryDirectory(prefix=f"mptool-bench-{engine}-")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mptool.benchmarks.engines", engine],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env={**os.environ, **env, "TMPDIR": self._tmp.name}, start_new_session=True,
        )
        self._start_reader()
        self._info = self._call({"model_dir": model_dir, "spec": asdict(spec)})["info"]

    def _start_reader(self) -> None:
        """Lines of the child's stdout arrive on a queue (None at its end), so that a request can
        wait with a deadline."""
        self._lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self._lines.put(line)
            self._lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def _replies(self) -> Iterator[str]:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.failed = True
                self._kill()
                self.close()
                raise MptoolError(f"{self.proc.args[-1]} did not answer within {self.timeout_s} s on "
                                  f"{self.model_dir} and was stopped (timeout_s; full log: {self.log_path})") from None
            if line is None:
                return
            yield line

    def _kill(self) -> None:
        kill_session(self.proc)  # the engine's own workers too

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child died: its log says why, below
        for line in self._replies():
            if line.startswith(REPLY_PREFIX):
                reply = json.loads(line[len(REPLY_PREFIX):])
                if "error" in reply:
                    self.failed = True
                    self.close()
                    raise MptoolError(f"{self.proc.args[-1]} failed on {self.model_dir}: {reply['error']} "
                                      f"(full log: {self.log_path})")
                return reply
        self.failed = True
        self.close()
        raise MptoolError(f"{self.proc.args[-1]} stopped on {self.model_dir}: "
                          f"{_last_error(self.log_path.read_text(errors='replace'))} (full log: {self.log_path})")

    def info(self) -> dict[str, Any]:
        return self._info

    def generate(self, prompts: np.ndarray, new_tokens: int) -> Sample:
        reply = self._call({"prompts": prompts.tolist(), "new_tokens": new_tokens})
        return Sample(**reply["sample"])

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._kill()
        self._log.close()
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            remove_vllm_shared_memory(Path(tmp.name))
            tmp.cleanup()
        if not self.failed:  # the log is kept only to explain a failure
            self.log_path.unlink(missing_ok=True)


REPLY_PREFIX = "mptool-bench-reply "
"""Line prefix of a child runner's replies on stdout (vLLM prints its own lines there too)."""

IN_PROCESS: dict[str, type[Runner]] = {"torch": TorchRunner, "onnxruntime": OrtRunner}
IN_CHILD: dict[str, type[Runner]] = {"vllm": VllmRunner}


def open_runner(engine: str, model_dir: str, spec: EngineSpec) -> Runner:
    """Load ``model_dir`` in ``engine``: in this process, or in a child for vLLM."""
    if engine in IN_CHILD:
        return ChildRunner(engine, model_dir, spec, vllm_env(spec))
    return IN_PROCESS[engine](model_dir, spec)


def _last_error(log: str) -> str:
    """The most telling line of a failed child's log: the last exception line, else the last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":")[0]
        if head.endswith(("Error", "Exception")) or " ERROR " in ln:
            return ln[:400]
    return lines[-1][:400] if lines else "no output"


def _serve(engine: str) -> None:
    """The child side of :class:`ChildRunner`: one JSON request per stdin line, one reply each."""

    def reply(obj: dict[str, Any]) -> None:
        print(REPLY_PREFIX + json.dumps(obj), flush=True)

    runner: Runner | None = None
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        try:
            if runner is None:
                runner = IN_CHILD[engine](request["model_dir"], EngineSpec(**request["spec"]))
                reply({"info": runner.info()})
            else:
                sample = runner.generate(np.asarray(request["prompts"], dtype=np.int64), request["new_tokens"])
                reply({"sample": asdict(sample)})
        except Exception as exc:  # reported to the parent, which raises it as one line
            import traceback

            traceback.print_exc()
            reply({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
            break
    sys.stdout.flush()
    sys.stderr.flush()
    # vLLM's shutdown can hang on CPU; every reply is out, leave at once.
    os._exit(0)


# ---------------------------------------------------------------- the sweep of one engine


@dataclass
class ModelRuns:
    """Everything one engine measured on one model."""

    info: dict[str, Any]
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    """Timed samples per cell label (``"b8 p128"``)."""


def sweep_pair(runners: dict[str, Runner], cells: list[Cell], vocab_size: int, new_tokens: int,
               warmup: int, repeats: int, seed: int,
               on_run: Callable[[str, str], None]) -> dict[str, ModelRuns]:
    """Warm up and time every cell on both loaded models, alternating them run by run.

    Dense and pruned take turns (ABBA order over the repeats), so a slow drift in background
    load touches both alike and the ratio stays fair. ``on_run(role, label)`` after each run.
    """
    roles = list(runners)
    runs = {role: ModelRuns(info=runner.info()) for role, runner in runners.items()}
    for cell in cells:
        prompts = make_prompts(vocab_size, cell, seed)
        for _ in range(warmup):
            for role in roles:
                runners[role].generate(prompts, new_tokens)
                on_run(role, cell.label)
        for i in range(repeats):
            for role in roles if i % 2 == 0 else roles[::-1]:
                runs[role].samples.setdefault(cell.label, []).append(runners[role].generate(prompts, new_tokens))
                on_run(role, cell.label)
    return runs


def measure(engine: str, models: dict[str, str], spec: EngineSpec, cells: list[Cell], vocab_size: int,
            new_tokens: int, warmup: int, repeats: int, seed: int,
            on_run: Callable[[str, str], None], on_load: Callable[[str], None] | None = None) -> dict[str, ModelRuns]:
    """Load every model of ``models`` (role -> folder) in ``engine`` and run the sweep on them."""
    runners: dict[str, Runner] = {}
    try:
        for role, folder in models.items():
            if on_load:
                on_load(role)
            runners[role] = open_runner(engine, folder, spec)
        return sweep_pair(runners, cells, vocab_size, new_tokens, warmup, repeats, seed, on_run)
    finally:
        for runner in runners.values():
            runner.close()


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
        "mptool": package_version("mptool"),
    }
    with contextlib.suppress(Exception):
        import torch

        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # the kernels, so the rounding
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


if __name__ == "__main__":
    _serve(sys.argv[1])
