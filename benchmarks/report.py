"""Outputs of `mptool bench`: an aligned terminal table, JSON, a Markdown table and a PNG plot.

All four read the result document :func:`mptool.benchmarks.sweep.run_bench` builds; nothing here
measures anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mptool.io import atomic_files

# (figure key in a model's figures, speed-up key, column title, scale, format)
COLUMNS = (
    ("ttft_s", "ttft", "TTFT ms", 1e3, "{:.1f}"),
    ("decode_tok_s", "decode", "decode tok/s", 1.0, "{:.0f}"),
    ("output_tok_s", "output", "output tok/s", 1.0, "{:.0f}"),
)


def _spread(stats: dict[str, Any]) -> str:
    """Half the min-max range as a percentage of the median."""
    if stats["n"] < 2 or not stats["median"]:
        return ""
    return f" ±{50 * (stats['max'] - stats['min']) / stats['median']:.0f}%"


def _pair(row: dict[str, Any], key: str, scale: float, fmt: str, spread: bool = True) -> str:
    d, p = row["dense"][key], row["pruned"][key]
    sd, sp = (_spread(d), _spread(p)) if spread else ("", "")
    return f"{fmt.format(d['median'] * scale)}{sd} → {fmt.format(p['median'] * scale)}{sp}"


def _ratio(row: dict[str, Any], key: str) -> str:
    return (f"{row['speedup'][key]:.2f}× / {row['ideal'][key]:.2f}× = "
            f"{row['measured_over_ideal'][key]:.2f}")


def rows(doc: dict[str, Any], spread: bool = True) -> list[list[str]]:
    """One table row per engine and cell: values dense → pruned, then speed-up / ideal = ratio."""
    out = []
    for r in doc["results"]:
        cells = [r["engine"], str(r["batch_size"]), str(r["prompt_len"])]
        for key, speed, _, scale, fmt in COLUMNS:
            cells += [_pair(r, key, scale, fmt, spread), _ratio(r, speed)]
        out.append(cells)
    return out


def headers() -> list[str]:
    out = ["engine", "batch", "prompt"]
    for _, _, title, _, _ in COLUMNS:
        out += [f"{title} dense → pruned", "speed-up / ideal = m÷i"]
    return out


def environment_lines(doc: dict[str, Any]) -> list[str]:
    """One line per engine (versions, dtype, device, threads, mode) and one for the host."""
    host = doc["host"]
    lines = [f"host: {host['cpu']}, {host['cpus_allowed']} CPUs, Python {host['python']}"
             + (f", GPU {host['gpu']}" if host.get("gpu") else "")
             + f", load {host.get('load_avg_1m')} → {host.get('load_avg_1m_end')}"]
    for engine, by_role in doc["engines"].items():
        info = by_role["dense"]
        versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        startup = f", start-up {info['startup_s']} s" if "startup_s" in info else ""
        lines.append(f"{engine}: {versions}; {info['dtype']} on {info['device']}, "
                     f"{info['threads']} threads, {info['mode']}{startup}")
    return lines


def _models_line(doc: dict[str, Any]) -> str:
    parts = []
    for role in ("dense", "pruned"):
        m = doc["models"][role]
        d = m["dims"]
        parts.append(f"{role} {Path(m['path']).name}: {m['params'] / 1e6:.1f} M params, "
                     f"{d['num_heads']} heads / {d['num_kv_heads']} KV heads, FFN {d['intermediate_size']}")
    return "; ".join(parts)


def print_table(doc: dict[str, Any]) -> None:
    """The aligned terminal table (stdout), with the environment under it."""
    from rich.console import Console
    from rich.table import Table

    cfg = doc["config"]
    table = Table(title=f"mptool bench: {cfg['new_tokens']} new tokens, median of {cfg['repeats']} "
                        f"(± half the min-max range); speed-up / ideal = measured ÷ ideal")
    for i, h in enumerate(headers()):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows(doc):
        table.add_row(*r)
    out = Console(width=200)
    out.print(table)
    out.print(_models_line(doc), highlight=False)
    for line in environment_lines(doc):
        out.print(line, highlight=False)


def markdown(doc: dict[str, Any]) -> str:
    """The results as a Markdown section: command, models, environment and the table."""
    cfg = doc["config"]
    lines = [
        "# mptool bench results", "",
        f"`{doc['command']}`", "",
        f"{doc['created']}, {doc['wall_s']} s. {_models_line(doc)}.", "",
        *[f"- {line}" for line in environment_lines(doc)], "",
        f"Median of {cfg['repeats']} timed runs after {cfg['warmup']} warm-up run(s) per cell, "
        "± half the min-max range. Each ratio cell is measured speed-up / ideal speed-up = "
        "measured ÷ ideal (TTFT: prefill FLOPs; decode: bytes read per output token; output: both "
        "phases at their ideal).", "",
    ]
    head = headers()
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for r in rows(doc):
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    """Throughput vs batch size, dense (dashed) vs pruned (solid), one colour per engine.

    Top row: decode tokens/s; bottom row: output tokens/s end to end; one column per prompt length.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompt_lens = sorted({r["prompt_len"] for r in doc["results"]})
    engines = list(dict.fromkeys(r["engine"] for r in doc["results"]))
    fig, axes = plt.subplots(2, len(prompt_lens), figsize=(5.5 * len(prompt_lens), 8), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, plen in enumerate(prompt_lens):
        for i, (key, title) in enumerate((("decode_tok_s", "decode tokens/s"),
                                          ("output_tok_s", "output tokens/s (end to end)"))):
            ax = axes[i, j]
            for k, engine in enumerate(engines):
                rs = sorted((r for r in doc["results"] if r["engine"] == engine and r["prompt_len"] == plen),
                            key=lambda r: r["batch_size"])
                xs = [r["batch_size"] for r in rs]
                for role, style in (("dense", "--"), ("pruned", "-")):
                    med = [r[role][key]["median"] for r in rs]
                    err = [[m - r[role][key]["min"] for m, r in zip(med, rs)],
                           [r[role][key]["max"] - m for m, r in zip(med, rs)]]
                    ax.errorbar(xs, med, yerr=err, fmt="o" + style, color=colours[k % len(colours)],
                                capsize=3, label=f"{engine} {role}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["batch_size"] for r in doc["results"]}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("batch size")
            ax.set_ylabel(title)
            ax.set_title(f"prompt {plen} tokens, {doc['config']['new_tokens']} new")
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    names = " vs ".join(Path(doc["models"][r]["path"]).name for r in ("dense", "pruned"))
    fig.suptitle(f"mptool bench: {names} (dashed dense, solid pruned)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_all(doc: dict[str, Any], out: Path) -> list[Path]:
    """Write ``<out>.json``, ``<out>.md`` and ``<out>.png``; returns their paths."""
    paths = [out.with_name(out.name + ext) for ext in (".json", ".md", ".png")]
    doc["outputs"] = [str(p) for p in paths]
    with atomic_files(paths) as tmps:  # all three or none
        tmps[0].write_text(json.dumps(doc, indent=2) + "\n")
        tmps[1].write_text(markdown(doc))
        plot(doc, tmps[2])
    return paths
