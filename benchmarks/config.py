"""`mptool bench`'s typed config, shared by the CLI, YAML recipes and the Python API.

``load_config(BenchConfig, "bench.yaml", {"engines": ["vllm"]})`` and
``BenchConfig(dense=..., pruned=..., engines=["vllm"])`` build the same object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ENGINES = ("torch", "onnxruntime", "vllm")
"""Engines `mptool bench` drives."""


@dataclass
class VllmOptions:
    """Options of the vLLM engine (each model runs in its own subprocess)."""

    eager: bool = False
    """Run eagerly (``enforce_eager``). Off: vLLM's compiled graph mode, what it serves with; a
    small model in eager mode is bound by per-layer Python overhead, not by its weights."""
    kv_cache_gib: int = 2
    """CPU only: GiB reserved for the KV cache (``VLLM_CPU_KVCACHE_SPACE``)."""
    timeout_s: int = 1800
    """Seconds an engine process may take to answer one request (its start-up included) before
    it is killed and the bench fails with its log."""
    gpu_memory_utilization: float = 0.4
    """GPU only: fraction of GPU memory each vLLM engine may take (weights + KV cache). The dense
    and the pruned engine are alive together and each start-up needs its fraction free, so two
    of them plus CUDA contexts must fit: keep it at or below about 0.45."""


@dataclass
class BenchConfig:
    """`mptool bench`: dense vs pruned in the serving engines, against the ideal speed-up."""

    dense: str | None = None
    """Dense model folder (config.json + *.safetensors)."""
    pruned: str | None = None
    """Pruned model folder of the same family and vocabulary."""
    engines: list[str] = field(default_factory=lambda: ["torch"])
    """Engines to run, any of torch, onnxruntime, vllm."""
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    """Sequences decoded together."""
    prompt_lens: list[int] = field(default_factory=lambda: [128, 512])
    """Prompt tokens per sequence (random token ids, the same for both models)."""
    new_tokens: int = 32
    """Tokens generated per sequence (end-of-sequence ignored), at least 2."""
    warmup: int = 1
    """Untimed runs of each sweep cell before the timed ones."""
    repeats: int = 3
    """Timed runs of each sweep cell; figures are their median, min, max and quartiles."""
    dtype: str | None = None
    """float32, bfloat16 or float16; None: the engine's serving default (torch and onnxruntime
    float32, vllm bfloat16)."""
    device: str | None = None
    """cpu or cuda; None: cuda when torch sees a GPU, else cpu."""
    threads: int | None = None
    """CPU threads each engine may use; None: every core this process may run on."""
    vllm: VllmOptions = field(default_factory=VllmOptions)
    cache_dir: str | None = None
    """Where engine builds (onnxruntime-genai models) are kept; None: ~/.cache/mptool/bench."""
    out: str = "runs/bench/bench"
    """Output stem: writes <out>.json, <out>.md and <out>.png."""
    seed: int = 0
    """Seed of the random prompts."""
    trust_remote_code: bool = False
    """Allow custom model code from the model folders (only when you trust them)."""
