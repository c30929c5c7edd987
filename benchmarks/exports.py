"""Export time, artefact size and parity of every target, for dense and pruned models, in one run.

    python -m mptool.benchmarks.exports dense=default p20=runs/demo p50=runs/cli50 --tag smollm2

Each (model, target, dtype) runs ``mptool export`` in its own subprocess, as a user would, into a
scratch folder that is removed afterwards (``--keep`` keeps it). A refused export (parity failure,
illegal tensor-parallel size) is a result, not an error: its exit status and one-line message are
recorded. Writes ``benchmarks/results/exports_<tag>.json`` (every export.json's checks, timings
and sizes) and ``exports_<tag>.md`` (the table the README quotes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mptool.benchmarks.quality import RESULTS
from mptool.io import write_results

# target:dtype[:tp sizes]; the vllm fp32 row asks for tp 1 and 2, where a 9-head model is refused
DEFAULT_TARGETS = ("hf:float32", "hf:bfloat16", "onnx:float32", "onnx:float16", "vllm:bfloat16:1",
                   "vllm:float32:1,2")


def parse_target(text: str) -> dict[str, Any]:
    """``target:dtype[:tp]`` → its parts; raises ValueError naming what is accepted."""
    from mptool.exporters.config import DTYPE_ALIASES, DTYPES

    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in DTYPES:
        raise ValueError(f"target {text!r}: expected TARGET:DTYPE[:TP] with TARGET one of {', '.join(DTYPES)}, "
                         f"e.g. vllm:float32:1,2")
    target, dtype = parts[0], DTYPE_ALIASES.get(parts[1], parts[1])
    if dtype not in DTYPES[target]:
        raise ValueError(f"target {text!r}: dtype must be one of {', '.join(DTYPES[target])}")
    tp = parts[2] if len(parts) == 3 else None
    if tp is not None and (target != "vllm" or not all(t.isdigit() and int(t) > 0 for t in tp.split(","))):
        raise ValueError(f"target {text!r}: tensor-parallel sizes are for vllm only, as positive integers like 1,2")
    return {"target": target, "dtype": dtype, "tp": tp}


def parse_model(text: str) -> tuple[str, str | None]:
    """``label=PATH`` (``default`` for the embedded model) → (label, path or None)."""
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise ValueError(f"model {text!r}: expected LABEL=PATH, e.g. p50=runs/cli50 or dense=default")
    if path != "default" and not Path(path).is_dir():
        raise ValueError(f"model {text!r}: {path} is not a folder")
    return label, None if path == "default" else path


def checks_summary(parity: dict[str, Any]) -> str:
    """One table cell: each check's max |diff| against its bound, greedy tokens matched, and how
    far the model computed in a lower precision is from the fp32 source (recorded, not bounded)."""
    cells = []
    for name, check in parity.items():
        bits = []
        if "max_abs_diff" in check and "bound" in check:
            bits.append(f"{check['max_abs_diff']:.3g} ≤ {check['bound']:.3g}")
        if "weights" in check:
            bits.append(f"{check['weights']['identical']}/{check['weights']['tensors']} tensors bit-exact")
        greedy = check.get("greedy", check)
        if "tokens_matched" in greedy:
            total = greedy["prompts"] * greedy["new_tokens"]
            bits.append(f"{greedy['tokens_matched']}/{total} greedy tokens"
                        + ("" if greedy.get("identical", True) else " then a tie"))
        if "served" in check:  # vLLM computing in the serving dtype: recorded
            served = check["served"]
            bits.append(f"vLLM in {check['engine_dtype']}: {served['mean_prefix']:.1f}/{served['new_tokens']} greedy "
                        f"tokens before the first difference from fp32 on average")
        if "in_dtype" in check:
            drift = check["in_dtype"]
            bits.append(f"computed in {drift['dtype']}: max diff {drift['max_abs_diff']:.3g} from fp32 "
                        f"({drift['relative']:.0%} of max logit), top-1 {drift['top1_agreement']:.0%}")
        if bits:
            cells.append(f"{name}: {', '.join(bits)}")
    return "; ".join(cells)


def short(error: str, limit: int = 220) -> str:
    text = error.removeprefix("error: ").replace("|", "/")
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def run_one(model: str | None, spec: dict[str, Any], out: Path, parity_text: str | None = None) -> dict[str, Any]:
    """``mptool export`` in a subprocess; the export.json record, or the refusal."""
    cmd = [str(Path(sys.executable).parent / "mptool"), "export", *([model] if model else []),
           "--target", spec["target"], "--dtype", spec["dtype"], "--out", str(out),
           *(["--tp", spec["tp"]] if spec["tp"] else []),
           *(["--parity-text", parity_text] if parity_text else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    row: dict[str, Any] = {"command": " ".join(["mptool", *cmd[1:]]), "rc": proc.returncode,
                           "wall_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode == 0:
        record = json.loads((out / "export.json").read_text())
        row.update(ok=True, seconds=record["seconds"], phase_seconds=record["phase_seconds"],
                   total_bytes=record["sizes"]["total_bytes"], shape=record["shape"], parity=record["parity"],
                   environment=record["environment"])
    else:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        row.update(ok=False, error=lines[-1] if lines else f"exit {proc.returncode}")
    return row


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Made by `{result['command']}` ({result['host']}); parity checks on "
             f"{result.get('probe', 'random token ids')}.", "",
             "| model | target | dtype | tp | time | size | checks |", "|---|---|---|---|---:|---:|---|"]
    for r in result["rows"]:
        if r["ok"]:
            lines.append(f"| {r['model']} | {r['target']} | {r['dtype']} | {r['tp'] or ''} | {r['seconds']:.1f} s | "
                         f"{r['total_bytes'] / 1e6:.1f} MB | {checks_summary(r['parity']).replace('|', '/')} |")
        else:
            lines.append(f"| {r['model']} | {r['target']} | {r['dtype']} | {r['tp'] or ''} | {r['wall_s']:.1f} s | "
                         f"refused (exit {r['rc']}) | {short(r['error'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mptool.benchmarks.exports", description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="LABEL=FOLDER (dense=default: the embedded SmolLM2-135M)")
    ap.add_argument("--targets", default=" ".join(DEFAULT_TARGETS),
                    help="space-separated TARGET:DTYPE[:TP] (default: %(default)s)")
    ap.add_argument("--tag", default="smollm2", help="results go to exports_<tag>.json/.md")
    ap.add_argument("--results", default=str(RESULTS), help="folder for the JSON and Markdown")
    ap.add_argument("--keep", default=None, help="keep the artefacts under this folder instead of removing them")
    ap.add_argument("--parity-text", default=None, help="run every export's parity checks on windows of this text "
                                                        "(mptool export --parity-text) instead of random token ids")
    args = ap.parse_args(argv)
    try:
        models = [parse_model(m) for m in args.models]
        specs = [parse_target(t) for t in args.targets.split()]
    except ValueError as exc:
        ap.error(str(exc))
    scratch = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mptool-exports-"))
    rows = []
    try:
        for label, path in models:
            for spec in specs:
                name = f"{label}-{spec['target']}-{spec['dtype']}" + (f"-tp{spec['tp'].replace(',', '')}"
                                                                       if spec["tp"] else "")
                row = {"model": label, "source": path or "default", **spec, **run_one(path, spec, scratch / name, args.parity_text)}
                rows.append(row)
                state = f"{row['seconds']:.1f} s, {row['total_bytes'] / 1e6:.1f} MB" if row["ok"] else row["error"]
                print(f"{name}: {state}", file=sys.stderr, flush=True)
                if not args.keep:
                    shutil.rmtree(scratch / name, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    given = list(sys.argv[1:] if argv is None else argv)
    result = {"command": " ".join(["python -m mptool.benchmarks.exports", *given]),
              "host": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "probe": f"windows of the text {args.parity_text}" if args.parity_text else "random token ids",
              "rows": rows}
    table = markdown(result)
    write_results(Path(args.results) / f"exports_{args.tag}", result, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
