"""Printing and JSON for `shapes` and `eval`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mptool.config import EvalConfig, ShapesConfig, to_dict
from mptool.errors import MptoolError
from mptool.progress import console


def shapes_rows(cfg: ShapesConfig) -> dict[str, Any]:
    from mptool.shapes import (RULES, all_legal, candidates, check_ratio, describe, no_target_message,
                               option_problems)

    from mptool.compress import model_dims

    check_ratio(cfg.ratio)
    problems = option_problems(cfg.tp, cfg.ffn_multiple)
    if problems:
        raise MptoolError("; ".join(problems))
    d = model_dims(cfg.model, config_only=True)
    rows = [describe(d, t) for t in candidates(d, cfg.ratio, cfg.tp, cfg.ffn_multiple)]
    if not rows and not all_legal(d, cfg.tp, cfg.ffn_multiple):  # no --ratio helps: say what does
        raise MptoolError(no_target_message(d, 0.0, cfg.tp, cfg.ffn_multiple))
    dense = describe(d, d.dense_target())
    budget = (1 - cfg.ratio) * dense["prunable_params"]
    return {
        "model": cfg.model or "embedded:SmolLM2-135M-Instruct",
        "dense": dense,
        "ratio": cfg.ratio,
        "tp": cfg.tp,
        "ffn_multiple": cfg.ffn_multiple,
        "budget_prunable_params": int(budget),
        "targets": rows,
        **({} if rows else {"none": no_target_message(d, budget, cfg.tp, cfg.ffn_multiple)}),
        "rules": [{"name": r.name, "engine": r.engine, "rule": r.doc} for r in RULES],
    }


def shapes_table(cfg: ShapesConfig, as_json: bool = False) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    result = shapes_rows(cfg)
    none = result.get("none", "")
    if as_json:
        print(json.dumps(result, indent=2))
        if not result["targets"]:
            raise MptoolError(none)  # the JSON is printed, and the exit status says nothing fits
        return result
    dense = result["dense"]
    table = Table(title=f"legal uniform targets removing ~{cfg.ratio:.0%} of prunable parameters "
                        f"(tp {','.join(map(str, cfg.tp))}, FFN multiple of {cfg.ffn_multiple})")
    for col in ("KV heads", "heads/group", "heads", "FFN", "total params", "prunable params", "% prunable kept"):
        table.add_column(col, justify="right")
    table.add_row(str(dense["kv_heads"]), str(dense["heads_per_group"]), str(dense["num_attention_heads"]),
                  str(dense["ffn"]),
                  f"{dense['total_params']:,}", f"{dense['prunable_params']:,}", "100.0 (dense)")
    for r in result["targets"]:
        table.add_row(str(r["kv_heads"]), str(r["heads_per_group"]), str(r["num_attention_heads"]), str(r["ffn"]),
                      f"{r['total_params']:,}", f"{r['prunable_params']:,}", f"{100 * r['prunable_kept']:.1f}")
    Console(width=140).print(table)
    if not result["targets"]:
        raise MptoolError(none)
    return result


def is_eval_result(path: Path) -> bool:
    """Whether ``path`` is an earlier `mptool eval` result (the only file its --out replaces): marked
    ``mptool_eval``, or, from before the marker, a perplexity record with its protocol and the config."""
    from mptool.io import json_object

    doc = json_object(path)
    if doc is None:
        return False
    ppl = doc.get("perplexity")
    return "mptool_eval" in doc or (isinstance(ppl, dict) and "protocol" in ppl and "config" in doc)


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    import os

    from mptool.compress import eval_text_for, measure_ppl, model_dims, short_eval_note
    from mptool.data import eval_token_stream
    from mptool.evaluate import resolve_tasks, run_tasks
    from mptool.io import atomic_files, output_problems, result_file_problems
    from mptool.models import check_token_ids, load_model, looks_like_path, resolve_model

    problems = cfg.ppl.problems()
    if cfg.limit is not None and cfg.limit < 1:
        problems.append(f"--limit {cfg.limit} must be >= 1 (examples per lm-eval task; leave it out for all)")
    if cfg.data is not None and looks_like_path(cfg.data) and not Path(cfg.data).expanduser().exists():
        problems.append(f"data path {cfg.data} does not exist (give a .txt, .jsonl, a folder or a datasets folder)")
    if cfg.out is not None:  # --out '' is refused, not taken for "the default place"
        problems += (output_problems(cfg.out, overwrite=True, flag="--out", folder=False)
                     or result_file_problems([Path(cfg.out).expanduser()], is_eval_result, "mptool eval"))
    if problems:
        raise MptoolError("; ".join(problems))
    resolved = resolve_tasks(cfg.tasks) if cfg.tasks else None  # unknown tasks fail before any work
    path = resolve_model(cfg.model)
    out = Path(cfg.out).expanduser() if cfg.out else (Path(path) / "eval.json" if Path(path).is_dir() else None)
    if not cfg.out and out is not None and not os.access(out.parent, os.W_OK):
        console.print(f"{out.parent} is not writable: the result is printed only (--out FILE to keep it)")
        out = None
    elif not cfg.out and out is not None and out.exists() and not is_eval_result(out):
        console.print(f"{out} is not an earlier `mptool eval` result and is kept: the result is printed only "
                      "(--out FILE to keep it)")
        out = None
    text, name = eval_text_for(cfg.data)
    context = model_dims(cfg.model, cfg.trust_remote_code).context  # from config.json: before the weights load
    if problems := cfg.ppl.context_problems(context):
        raise MptoolError("; ".join(problems))
    with console.status("loading model"):
        model, tokenizer = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    ids = eval_token_stream(tokenizer, text, cfg.ppl.max_tokens)
    check_token_ids(ids, model, tokenizer, "evaluation text")
    if note := short_eval_note(ids, cfg.ppl.max_tokens):
        console.print(note)
    result: dict[str, Any] = {"mptool_eval": 1, "model": str(path),
                              "perplexity": measure_ppl(model, ids, cfg.ppl.protocol(name, context), "eval")}
    if cfg.tasks:
        with console.status(f"lm-eval: {', '.join(cfg.tasks)}"):
            result["tasks"] = run_tasks(path, resolved, cfg.limit)
    result["config"] = to_dict(cfg)
    text = json.dumps(result, indent=2)
    if out is not None:
        with atomic_files([out]) as (tmp,):
            tmp.write_text(text)
    print(text)
    return result
