"""`ExportConfig`: the typed config of `mptool export`, shared by the CLI, YAML and Python.

``load_config(ExportConfig, "export.yaml", {"target": "vllm", "tp": [1, 2]})`` and
``ExportConfig(target="vllm", tp=[1, 2])`` build the same object; the resolved config is saved
in ``export.json`` beside every artefact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

TARGETS = ("hf", "onnx", "vllm")

# Dtypes each target can write, the first one being its default. hf keeps the source checkpoint's
# dtype when it has one of these; onnx runs fp32 on CPU (fp16 is for the CUDA provider and also
# runs on CPU); vLLM serves bf16.
DTYPES: dict[str, tuple[str, ...]] = {
    "hf": ("float32", "bfloat16", "float16"),
    "onnx": ("float32", "float16"),
    "vllm": ("bfloat16", "float16", "float32"),
}

DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
                 "float": "float32"}


@dataclass
class ParityConfig:
    """How an export is checked against PyTorch (transformers, fp32)."""

    batch: int = 2
    """Random sequences in the logits check."""
    seq_len: int = 32
    """Tokens per random sequence in the logits check."""
    prompts: int = 3
    """Random prompts for the greedy-decoding check (onnx, vllm)."""
    prompt_len: int = 12
    """Tokens per greedy prompt."""
    new_tokens: int = 16
    """Greedy decode steps compared token by token with transformers (EOS suppressed)."""
    seed: int = 0
    """Seed of the random token ids (never calibration or evaluation text), or of the windows'
    offsets in ``text``."""
    text: str | None = None
    """Text (as ``compress --data`` takes it: .txt, .jsonl, a folder, a datasets folder, a hub
    name) whose token windows replace the random ids in the logits and greedy checks; None: random
    ids. Random ids reach activations text does not: the compensated 50% SmolLM2 fires its layer-11
    massive activation at 61% of random-id positions and 0.7% of Persuasion's, the dense model at
    1.6% and 0.4%, so a low-precision export can fail on random ids and agree on the text it serves."""


@dataclass
class OnnxConfig:
    """Options of the onnx target (onnxruntime-genai model builder)."""

    provider: str = "cpu"
    """Execution provider written into genai_config.json: cpu or cuda. The parity check runs on
    CUDA when onnxruntime has it, else on the CPU provider (the graph runs on both)."""


@dataclass
class VllmConfig:
    """Options of the vllm target."""

    engine_check: bool = True
    """Load the export with vllm.LLM (when vLLM is installed) and compare greedy tokens."""
    engine_tp: list[int] | None = None
    """Tensor-parallel sizes to load for real; None: every size in --tp this host can run."""
    served_dtype_check: bool = True
    """Where the export's dtype is not fp32, also run vLLM computing in it (what serve.sh serves)
    and record how many greedy tokens follow the fp32 reference: recorded, not bounded."""
    max_model_len: int = 256
    """Context length of the check's engine (small: the CPU KV cache stays small); capped at the
    model's own context."""
    kv_cache_gib: int = 1
    """VLLM_CPU_KVCACHE_SPACE for the CPU check."""
    timeout_s: int = 900
    """Give up on one engine load after this many seconds."""


@dataclass
class ExportConfig:
    """`mptool export`: write a model for one engine and prove it matches PyTorch."""

    model: str | None = None
    """HF model folder (e.g. written by `mptool compress`) or hub id; None: embedded SmolLM2-135M."""
    target: str = "hf"
    """Engine to export for: hf (safetensors), onnx (onnxruntime-genai), vllm."""
    out: str | None = None
    """Output folder (written atomically); None: runs/<model name>-<target>."""
    dtype: str | None = None
    """Weight dtype; None: hf the source checkpoint's (else float32), onnx float32, vllm bfloat16."""
    tp: list[int] = field(default_factory=lambda: [1])
    """Tensor-parallel sizes the export must support (legality checked for vllm)."""
    max_shard_size: str = "2GB"
    """safetensors shards above this size are split (hf, vllm)."""
    parity: ParityConfig = field(default_factory=ParityConfig)
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    overwrite: bool = False
    """Replace an existing output folder."""
    trust_remote_code: bool = False
    """Allow custom model code from the model folder or hub (only when you trust it)."""

    def resolved_dtype(self, source_dtype: str | None = None) -> str:
        """The dtype to write: the given one (aliases like bf16 accepted); else, for hf, the
        source checkpoint's dtype when hf writes it; else the target's default."""
        if self.dtype is not None:
            return DTYPE_ALIASES.get(self.dtype, self.dtype)
        if self.target == "hf" and source_dtype in DTYPES["hf"]:
            return source_dtype
        return DTYPES[self.target][0]

    def vllm_check_len(self, context: int | None) -> int:
        """The context of the vLLM check engine: vllm.max_model_len, at most the model's own."""
        return min(self.vllm.max_model_len, context) if context else self.vllm.max_model_len

    def resolved_out(self) -> Path:
        if self.out is not None:
            return Path(self.out).expanduser()
        src = Path(self.model).expanduser() if self.model else None
        # a local folder by its real name (`export .` is runs/<folder>-hf, not runs/-hf); a hub id by its last part
        name = ((src.resolve().name if src.exists() else src.name) or "model") if src else "smollm2-135m-instruct"
        return Path("runs") / f"{name}-{self.target}"
