"""One table from several ``mptool compress`` reports: shape, training tokens, perplexity.

    python -m mptool.benchmarks.report_table runs/a/report.json runs/b/report.json --out table

Writes ``<out>.json`` (one row per report, in the order given) and ``<out>.md``. Used for runs
made outside the quality benchmark, e.g. the larger-budget GPU runs of ``scripts/gpu_lease.sh``
(``benchmarks/results/gpu_h200/``), where each method is one ``compress`` command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mptool.errors import MptoolError
from mptool.io import write_results


def row(report: dict[str, Any], name: str) -> dict[str, Any]:
    """The table row of one report: what was cut, with how many training tokens, to what perplexity."""
    try:
        dense, pruned = report["dense"], report["pruned"]
        mp = report.get("maskprune") or {}
        rec = report.get("recovery") or {}
        before = report.get("before_recovery") or {}
        return {
            "run": name,
            "method": report["method"] + (" + recovery" if rec.get("steps") else ""),
            "target": [pruned["kv_heads"], pruned["heads_per_group"], pruned["ffn"]],
            "prunable_removed": report["prunable_removed"],
            "params": pruned["params_counted"],
            "mask_tokens": mp.get("tokens") or 0,
            "recovery_tokens": rec.get("tokens") or 0,
            "train_tokens": (mp.get("tokens") or 0) + (rec.get("tokens") or 0),
            "dense_ppl": dense["perplexity"]["ppl"],
            "ppl_before_recovery": before.get("ppl"),
            "ppl": pruned["perplexity"]["ppl"],
            "ppl_ratio": report["ppl_ratio"],
            "final_violation": mp.get("final_violation"),
            "wall_s": report["timings"]["total_s"],
            "eval": pruned["perplexity"]["protocol"],
        }
    except (KeyError, TypeError) as e:
        raise MptoolError(f"{name}: not an mptool compress report (missing {e}); "
                          "expected the report.json that mptool compress writes") from None


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| run | method | target (KV, heads/group, FFN) | removed | params | training tokens "
            "(masks + recovery) | ppl before recovery | ppl | × dense | wall s |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        before = f"{r['ppl_before_recovery']:.2f}" if r["ppl_before_recovery"] is not None else "-"
        lines.append(
            f"| {r['run']} | {r['method']} | ({', '.join(map(str, r['target']))}) | "
            f"{r['prunable_removed']:.1%} | {r['params'] / 1e6:.1f} M | "
            f"{r['train_tokens']:,} ({r['mask_tokens']:,} + {r['recovery_tokens']:,}) | {before} | "
            f"{r['ppl']:.2f} | {r['ppl_ratio']:.3f} | {r['wall_s']:.0f} |")
    dense = sorted({round(r["dense_ppl"], 2) for r in rows})
    return "\n".join(lines) + f"\n\nDense perplexity: {', '.join(map(str, dense))}.\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", help="report.json files (or folders holding one)")
    ap.add_argument("--out", required=True, help="output stem: <out>.json and <out>.md")
    args = ap.parse_args(argv)
    rows = []
    for item in args.reports:
        path = Path(item)
        path = path / "report.json" if path.is_dir() else path
        if not path.is_file():
            raise SystemExit(f"error: no report at {path}; give report.json files or folders with one")
        name = path.parent.name if path.name == "report.json" else path.stem.removesuffix("_report")
        try:
            rows.append(row(json.loads(path.read_text()), name))
        except (json.JSONDecodeError, MptoolError) as e:
            raise SystemExit(f"error: {e}") from None
    table = markdown(rows)
    write_results(Path(args.out), {"rows": rows}, table)
    print(table)


if __name__ == "__main__":
    main()
