"""The model card (README.md) written into every export, with the pruning report when there is one."""

from __future__ import annotations

from typing import Any

from mptool.exporters.common import human_bytes

_SHAPE_COLUMNS = ("KV heads", "heads/group", "heads", "FFN", "parameters", "prunable", "perplexity")


def _report_section(report: dict[str, Any]) -> list[str]:
    lines = ["## Pruning report", ""]
    lines.append("| | " + " | ".join(_SHAPE_COLUMNS) + " |")
    lines.append("|---|" + "---:|" * len(_SHAPE_COLUMNS))
    for name in ("dense", "pruned"):
        r = report.get(name) or {}
        ppl = (r.get("perplexity") or {}).get("ppl")
        cells = [r.get("kv_heads"), r.get("heads_per_group"), r.get("num_attention_heads"), r.get("ffn"),
                 f"{r['total_params']:,}" if isinstance(r.get("total_params"), int) else None,
                 f"{r['prunable_params']:,}" if isinstance(r.get("prunable_params"), int) else None,
                 f"{ppl:.2f}" if isinstance(ppl, (int, float)) else None]
        lines.append(f"| {name} | " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    lines.append("")
    facts = []
    if report.get("method"):
        facts.append(f"Method: `{report['method']}`")
    if report.get("model"):
        facts.append(f"source model: `{report['model']}`")
    if isinstance(report.get("prunable_removed"), (int, float)):
        facts.append(f"{report['prunable_removed']:.1%} of prunable parameters removed")
    if facts:
        lines += ["; ".join(facts) + ".", ""]
    protocol = ((report.get("pruned") or {}).get("perplexity") or {}).get("protocol")
    if protocol:
        tokens = report["pruned"]["perplexity"].get("tokens")
        lines += [f"Perplexity: held-out text `{protocol.get('text')}`, {protocol.get('window')}-token "
                  f"windows, stride {protocol.get('stride')}, {tokens} tokens scored"
                  + (f"; ratio pruned/dense x{report['ppl_ratio']:.2f}." if isinstance(report.get("ppl_ratio"), (int, float)) else "."), ""]
    # run from Python (no command line), the resolved config in this folder reproduces it
    command = report.get("command") or "mptool compress --config mptool-config.yaml"
    lines += ["Made by:", "", "```bash", command, "```", ""]
    return lines


def model_card(name: str, record: dict[str, Any], report: dict[str, Any] | None, usage: str) -> str:
    """The README.md text: shape, pruning report, the export check and how to load it."""
    shape = record["shape"]
    lines = [
        "---",
        "library_name: transformers" if record["target"] != "onnx" else "library_name: onnxruntime-genai",
        "pipeline_tag: text-generation",
        "tags: [" + ", ".join(["mptool", *(["pruned", "structured-pruning"] if report else []),
                               record["target"]]) + "]",
        "---",
        "",
        f"# {name}",
        "",
        f"A `{shape['architecture']}` model exported by `mptool export --target {record['target']}` "
        f"({record['dtype']}). Every decoder layer has the same shape, so engines load it with no custom "
        "code.",
        "",
        "## Shape",
        "",
        "| hidden | layers | heads | KV heads | head_dim | FFN | vocab | parameters |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {shape['hidden_size']} | {shape['num_layers']} | {shape['num_heads']} | {shape['num_kv_heads']} "
        f"| {shape['head_dim']} | {shape['intermediate_size']} | {shape['vocab_size']} | {shape['parameters']:,} |",
        "",
    ]
    if report:
        lines += _report_section(report)
    lines += ["## Export check", "", f"Against transformers in fp32, on {record.get('probe', 'random token ids')}:", ""]
    for name_, check in record["parity"].items():
        lines.append(f"- {name_}: {_describe_check(check)}")
    lines += [f"- model files: {human_bytes(record['sizes']['total_bytes'])} (before this card, "
              "export-config.yaml and export.json)", "",
              "## Use", "", usage.strip(), ""]
    return "\n".join(lines)


def _describe_check(check: Any) -> str:
    if isinstance(check, dict) and "max_abs_diff" in check:
        text = (f"max |logit diff| {check['max_abs_diff']:.3g} <= {check['bound']:.3g} "
                f"(atol {check['tolerance']['atol']:g} + rtol {check['tolerance']['rtol']:g} x max |logit|)")
        if "weights" in check:
            text += f"; {check['weights']['identical']} written tensors identical to the source's"
        if "in_dtype" in check:
            d = check["in_dtype"]
            text += (f"; computed in {d['dtype']}: max |diff| {d['max_abs_diff']:.3g} "
                     f"({d['relative']:.1%} of max |logit|), top-1 agreement {d['top1_agreement']:.1%}")
        return text
    if isinstance(check, dict) and "tokens_matched" in check:
        ties = f", {len(check['ties'])} tie(s)" if check.get("ties") else ""
        return (f"{check['prompts']} prompts x {check['new_tokens']} greedy tokens, "
                f"{check['tokens_matched']} matched{ties}")
    if isinstance(check, dict) and "skipped" in check:
        return f"skipped: {check['skipped']}"
    if isinstance(check, dict) and "tp" in check:
        return f"tensor parallel {check['tp']}: " + _describe_check(check.get("greedy"))
    return str(check)
