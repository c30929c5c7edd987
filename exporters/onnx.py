"""The onnx target: a decoder with KV cache for ONNX Runtime, built by onnxruntime-genai.

Written: ``model.onnx`` + ``model.onnx.data`` (inputs ``input_ids``, ``attention_mask``, optional
``position_ids``, ``past_key_values.N.key/value``; outputs ``logits``, ``present.N.key/value``;
batch and sequence dynamic), ``genai_config.json``, the tokenizer, a model card. The folder is
what an onnxruntime-genai user runs as it is::

    import onnxruntime_genai as og
    model = og.Model("DIR"); generator = og.Generator(model, og.GeneratorParams(model))

**Why onnxruntime-genai's model builder** (``python -m onnxruntime_genai.models.builder``): it is
maintained with ONNX Runtime, emits the fused ``GroupQueryAttention`` decoder that ORT's kernels
are tuned for, writes the runtime config and tokenizer, converts Llama, Mistral, Qwen2 and Qwen3
offline in seconds, and respects an explicit ``head_dim`` when ``hidden != heads x head_dim``
(pruned heads). The alternatives fail in this environment: optimum-onnx requires
``transformers<4.58`` (vLLM needs ``>=5.16``) and its transformers-5 fork failed on a pruned model;
``torch.onnx.export(dynamo=True)`` works on transformers 5 but needs a hand-written KV-cache
wrapper and ships no runtime config.

**fp16.** The builder's valid pairs are FP32 CPU and FP16 CUDA/DML/TRT-RTX; FP16 CPU is not one
of them. Asked for ``-p fp16 -e cpu`` it does build a graph (MultiHeadAttention + repeat_kv
instead of GroupQueryAttention), whose prefill is right but whose first decode step fails in
onnxruntime 1.32 ("Shape mismatch attempting to re-use buffer" in an inserted Cast; it only runs
with ``enable_mem_reuse`` off, which onnxruntime-genai cannot set). So fp16 is always built as
the GroupQueryAttention graph of ``-e cuda`` (with ``fuse_qk_norm_gqa=false``: ORT's CPU GQA
kernel rejects fused q/k norms, Qwen3), which runs on the CUDA provider of onnxruntime-gpu and on
the CPU provider alike; ``--onnx-provider`` only chooses what ``genai_config.json`` names.
fp32 is for the CPU provider: the builder's FP32 CUDA graph does not load ("Graph output
(present.0.key) does not exist"), so ``--onnx-provider cuda`` requires fp16.

**Check** (:data:`TOLERANCE`): logits of a prefill and of teacher-forced decode steps with the KV
cache, run with plain ``onnxruntime.InferenceSession``, against the fp32 source; then
``parity.new_tokens`` greedy steps from random prompts (or ``parity.text`` windows) with ``onnxruntime_genai`` on the folder as
written, token by token against transformers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mptool.errors import MptoolError
from mptool.exporters.common import (Tolerance, compare_logits, compare_tokens,
                                     reference_greedy, special_ids)

# Engine vs the fp32 source, max |diff| <= atol + rtol * max |logit|, per dtype. Measured on 2 x 32
# random ids: tiny models fp32 4e-7, fp16 1e-3 (max |logit| ~1); SmolLM2-135M fp32 1.0e-4
# prefill / 2.6e-4 decode, fp16 0.14 (max |logit| 33.7); the pruned SmolLM2 (6 heads, FFN 768,
# one-shot) fp32 0.0104 (max |logit| 31.2) -- PyTorch's own fp32 differs from fp64 by 0.0102 on
# that model, so fp32 is allowed 0.1 % of the largest logit, not less.
TOLERANCE: dict[str, Tolerance] = {
    "float32": Tolerance(atol=1e-4, rtol=1e-3),
    "float16": Tolerance(atol=1e-2, rtol=0.04),
}

PROVIDERS = ("cpu", "cuda")
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
"""What the builder converts among mptool's families (all four, tested)."""

PHASES = ("write fp32 source", "build ONNX (onnxruntime-genai builder)",
          "compare prefill/decode logits (onnxruntime)", "greedy decode (onnxruntime-genai)")
DECODE_STEPS = 4
"""Teacher-forced single-token steps (with the KV cache) at the end of the logits check."""

USAGE = """
```python
import onnxruntime_genai as og

model = og.Model("{out}")
tokenizer = og.Tokenizer(model)
params = og.GeneratorParams(model)
params.set_search_options(max_length=64)
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode("It is a truth universally acknowledged"))
while not generator.is_done():
    generator.generate_next_token()
print(tokenizer.decode(generator.get_sequence(0)))
```

The decoder alone runs with `onnxruntime.InferenceSession("{out}/model.onnx")`: feed `input_ids`,
`attention_mask` (and `position_ids` when listed) and `past_key_values.N.key/value` of shape
`[batch, kv_heads, past_len, head_dim]` (length 0 for a prefill).
"""

_REQUIRED = {"onnxruntime": "onnxruntime", "onnxruntime_genai": "onnxruntime-genai", "onnx": "onnx",
             "onnx_ir": "onnx-ir"}


def validate(cfg: Any, spec: Any) -> list[str]:
    from mptool.models import read_config

    problems = []
    if cfg.parity.seq_len <= DECODE_STEPS:
        problems.append(f"parity.seq_len {cfg.parity.seq_len} must exceed the {DECODE_STEPS} decode steps the "
                        "onnx check runs after its prefill")
    if cfg.onnx.provider not in PROVIDERS:
        problems.append(f"--onnx-provider {cfg.onnx.provider!r} is not one of {', '.join(PROVIDERS)}")
    elif cfg.onnx.provider == "cuda" and cfg.resolved_dtype() == "float32":
        # the builder's FP32 CUDA graph names KV outputs it never produces ("Graph output
        # (present.0.key) does not exist"); FP16 is what ONNX Runtime's CUDA kernels are for
        problems.append("--target onnx --onnx-provider cuda needs --dtype float16 (the model builder's fp32 "
                        "CUDA graph does not load in onnxruntime 1.32); fp32 is for the CPU provider")
    missing = [pip for mod, pip in _REQUIRED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        problems.append(f"the onnx target needs {', '.join(missing)}: pip install 'mptool[cpu]' "
                        "(or [gpu] on CUDA hosts)")
    try:
        config = read_config(spec, cfg.trust_remote_code)
    except MptoolError as e:
        problems.append(str(e))
        return problems
    arch = (config.architectures or ["?"])[0]
    if arch not in ARCHITECTURES:
        problems.append(f"the onnx target converts {', '.join(ARCHITECTURES)}; {spec} is {arch}")
    return problems


def _cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def build(source: Path, out: Path, dtype: str, provider: str) -> dict[str, Any]:
    """Run the onnxruntime-genai model builder on an HF folder; returns what it ran and how long.

    The builder runs in this process (its module API is what ``python -m
    onnxruntime_genai.models.builder`` calls; a subprocess would re-import torch and transformers,
    ~5 s); its chatter is captured and shown only when it fails.

    Raises:
        MptoolError: the builder failed (its last output lines are in the message).
    """
    import contextlib
    import io

    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    from onnxruntime_genai.models import builder as og_builder

    ep = "cpu" if dtype == "float32" else "cuda"
    precision = {"float32": "fp32", "float16": "fp16"}[dtype]
    # full-length KV buffers on sliding-window layers too: the window is still applied by the
    # attention op (local_window_size), and the cache has the layout every other layer has
    extra = (["fuse_qk_norm_gqa=false"] if ep == "cuda" else []) + ["windowed_kv_cache=false"]
    cache = out / ".builder-cache"
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            options = og_builder.parse_extra_options(None, str(source), str(out), precision, ep, str(cache),
                                                     extra or None)
            og_builder.create_model(None, str(source), str(out), precision, ep, str(cache), **options)
    except Exception as e:  # the builder raises bare Exception/NotImplementedError/ValueError
        lines = [ln for ln in log.getvalue().splitlines() if ln.strip()]
        raise MptoolError(f"onnxruntime-genai's model builder failed: {type(e).__name__}: {e} "
                          f"(last output: {' | '.join(lines[-2:])})") from e
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    seconds = time.perf_counter() - start
    genai = json.loads((out / "genai_config.json").read_text())
    if provider == "cpu":  # the fp16 graph was built for CUDA; it runs on the CPU provider too
        genai["model"]["decoder"]["session_options"]["provider_options"] = []
        (out / "genai_config.json").write_text(json.dumps(genai, indent=4) + "\n")
    command = (f"python -m onnxruntime_genai.models.builder -i SOURCE -o OUT -p {precision} -e {ep}"
               + (f" --extra_options {' '.join(extra)}" if extra else ""))
    return {"builder_command": command, "builder_seconds": round(seconds, 1),
            "execution_provider_built": ep, "provider": provider,
            "attention_op": _attention_op(out / genai["model"]["decoder"]["filename"])}


def _attention_op(path: Path) -> str | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    return next((op for op in ("GroupQueryAttention", "MultiHeadAttention", "Attention") if op in ops), None)


def sliding_window(config: Any) -> int | None:
    """The attention window the PyTorch model applies, or None (full attention in every layer)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def mark_sliding_layers(folder: Path, config: Any) -> None:
    """Write ``layer_types`` into the builder's source config where the model has none but applies
    its window everywhere (Mistral): the builder sets the attention op's window only on layers
    ``layer_types`` marks, so without it the ONNX model attends past the window."""
    if sliding_window(config) is None or getattr(config, "layer_types", None) is not None:
        return
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw["layer_types"] = ["sliding_attention"] * config.num_hidden_layers
    path.write_text(json.dumps(raw, indent=2) + "\n")


def onnx_logits(folder: Path, ids: torch.Tensor, providers: list[str],
                decode_steps: int = DECODE_STEPS) -> tuple[torch.Tensor, int]:
    """Logits of ``ids`` from the decoder run with plain onnxruntime.

    The first ``T - decode_steps`` tokens go in as one prefill with an empty KV cache; each of
    the last ``decode_steps`` goes in alone with the cache the previous call returned, so both
    paths are checked. Returns ``[batch, T, vocab]`` fp32 logits and the prefill length.
    """
    import onnxruntime as ort

    genai = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    session = ort.InferenceSession(str(folder / genai["filename"]), providers=providers)
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    kv_dtype = np.float16 if "float16" in inputs[genai["inputs"]["past_key_names"] % 0].type else np.float32
    layers, kv, head = genai["num_hidden_layers"], genai["num_key_value_heads"], genai["head_size"]
    names = genai["inputs"]
    batch, total = ids.shape
    prefill = max(1, total - decode_steps)
    past = {}
    for i in range(layers):
        for kind in ("past_key_names", "past_value_names"):
            past[names[kind] % i] = np.zeros((batch, kv, 0, head), kv_dtype)
    done, chunks = 0, []
    while done < total:
        length = prefill if done == 0 else 1
        chunk = ids[:, done:done + length].numpy().astype(np.int64)
        feeds = {names["input_ids"]: chunk,
                 names["attention_mask"]: np.ones((batch, done + length), np.int64), **past}
        if "position_ids" in inputs:
            feeds["position_ids"] = np.tile(np.arange(done, done + length, dtype=np.int64), (batch, 1))
        result = dict(zip(outputs, session.run(outputs, feeds)))
        chunks.append(torch.from_numpy(result[genai["outputs"]["logits"]].astype(np.float32)))
        for i in range(layers):
            past[names["past_key_names"] % i] = result[genai["outputs"]["present_key_names"] % i]
            past[names["past_value_names"] % i] = result[genai["outputs"]["present_value_names"] % i]
        done += length
    return torch.cat(chunks, dim=1), prefill


def genai_greedy(folder: Path, prompts: list[list[int]], new_tokens: int, cpu: bool) -> list[list[int]]:
    """Greedy tokens from onnxruntime-genai on the folder as written (EOS suppressed via min_length)."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if cpu:
        config.clear_providers()
    model = og.Model(config)
    out = []
    for prompt in prompts:
        params = og.GeneratorParams(model)
        length = len(prompt) + new_tokens
        params.set_search_options(do_sample=False, max_length=length, min_length=length)
        generator = og.Generator(model, params)
        generator.append_tokens(list(prompt))
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        out.append(tokens)
        del generator
    del model
    return out


def export(src: Any, tmp: Path, dtype: str, cfg: Any, advance: Callable[..., None]) -> dict[str, Any]:
    """Write the onnx target into ``tmp`` and check it; returns the parity record."""
    from mptool.exporters.hf import copy_provenance, save_checkpoint

    advance(0, info=PHASES[0])
    staging = tmp / ".hf-source"
    staging.mkdir()
    save_checkpoint(src.model, src.tokenizer, staging, "float32", cfg.max_shard_size, None)
    mark_sliding_layers(staging, src.model.config)
    advance(1, info=PHASES[1])
    built = build(staging, tmp, dtype, cfg.onnx.provider)
    shutil.rmtree(staging)
    copy_provenance(src.folder, tmp)
    advance(1, info=PHASES[2])

    on_cuda = cfg.onnx.provider == "cuda" and _cuda_available()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if on_cuda else ["CPUExecutionProvider"]
    tol = TOLERANCE[dtype]
    logits, prefill = onnx_logits(tmp, src.ids, providers)
    what = f"onnx export ({dtype}, {'CUDA' if on_cuda else 'CPU'} provider)"
    checks = {
        "onnxruntime_prefill_logits": compare_logits(logits[:, :prefill], src.ref_logits[:, :prefill],
                                                     tol, what + " prefill"),
        "onnxruntime_decode_logits": compare_logits(logits[:, prefill:], src.ref_logits[:, prefill:],
                                                    tol, what + " decode steps with KV cache"),
    }
    window = sliding_window(src.model.config)
    context = getattr(src.model.config, "max_position_embeddings", None)
    if window is not None and (context is None or window + 16 + DECODE_STEPS <= context):
        # the probes above are shorter than any real window: one sequence that runs past it, its
        # prefill ending beyond the window and its decode steps further on
        from mptool.exporters.common import probe_ids, reference_logits

        length = window + 16 + DECODE_STEPS  # the prefill ends 16 tokens past the window
        stream = src.stream if src.stream is not None and len(src.stream) >= length else None  # else random ids
        long = probe_ids(src.tokenizer, src.model.config, (1, length), cfg.parity.seed + 2, stream)
        with torch.no_grad():
            ref = reference_logits(src.model, long)
        got = onnx_logits(tmp, long, providers)[0]
        checks["onnxruntime_beyond_window_logits"] = compare_logits(
            got, ref, tol, what + f" logits past the {window}-token sliding window")
        checks["onnxruntime_beyond_window_logits"]["tokens"] = int(long.shape[1])
    advance(1, info=PHASES[3])
    p = cfg.parity
    prompts = src.probe((p.prompts, p.prompt_len), p.seed + 1).tolist()
    suppress = special_ids(src.tokenizer, src.model.config, getattr(src.model, "generation_config", None))
    reference = reference_greedy(src.model, prompts, p.new_tokens, suppress)
    tokens = genai_greedy(tmp, prompts, p.new_tokens, cpu=not on_cuda)
    checks["onnxruntime_genai_greedy"] = compare_tokens(tokens, reference, tol.bound(src.ref_logits),
                                                        what.replace("onnx export", "onnxruntime-genai greedy"))
    advance(1)
    return {"tolerance": tol.as_dict(),
            "max_abs_diff": max(checks["onnxruntime_prefill_logits"]["max_abs_diff"],
                                checks["onnxruntime_decode_logits"]["max_abs_diff"]),
            "parity": checks, "onnx": {**built, "validated_on": "cuda" if on_cuda else "cpu"}}


def usage(out: Path, record: dict[str, Any]) -> str:
    return USAGE.format(out=out)
