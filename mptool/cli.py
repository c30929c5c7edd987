"""The `mptool` command line: parse, build the typed config, call one library function.

Heavy imports (torch, transformers) happen inside the commands so `mptool --help` is instant.
Every option defaults to None so it only overrides a YAML recipe when given.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional

import typer

from mptool.errors import MptoolError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Uniform structured pruning of Llama-family LLMs to plain, engine-ready checkpoints.",
    pretty_exceptions_enable=False,
)



def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The one boundary: a MptoolError prints one red line and exits 2; bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # mptool shows its own rich progress; the libraries' tqdm bars would bury errors.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        try:
            _quiet_libraries()
            return fn(*args, **kwargs)
        except MptoolError as e:
            from rich.markup import escape

            from mptool.progress import console

            console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _quiet_libraries() -> None:
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


ModelArg = typer.Argument(None, help="HF model folder (config.json + *.safetensors) or hub id; "
                                     "default: the embedded SmolLM2-135M-Instruct.")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML recipe; flags override it.")


def _tp(value: Optional[str]) -> Optional[list[int]]:
    if value is None:
        return None
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise MptoolError(f"--tp {value!r} must be comma-separated integers, e.g. 1,2,4,8") from None
    if not sizes or any(s < 1 for s in sizes):
        raise MptoolError(f"--tp {value!r} must list positive tensor-parallel sizes, e.g. 1,2,4,8")
    return sizes


@app.command(epilog="Example: mptool compress --ratio 0.5 --max-steps 60 --out runs/smol-50")
@user_errors
def compress(
    model: Optional[str] = ModelArg,
    method: Optional[str] = typer.Option(None, help="maskprune (default) | magnitude | wanda-sp | flap"),
    ratio: Optional[float] = typer.Option(None, help="Fraction of prunable parameters to remove, in (0, 1)."),
    kv_heads: Optional[int] = typer.Option(None, help="Explicit target: KV groups kept per layer."),
    heads_per_group: Optional[int] = typer.Option(None, help="Explicit target: query heads per kept group."),
    ffn: Optional[int] = typer.Option(None, help="Explicit target: FFN channels per layer."),
    tp: Optional[str] = typer.Option(None, help="Tensor-parallel sizes the result must support, e.g. 1,2,4."),
    ffn_multiple: Optional[int] = typer.Option(None, help="FFN widths are multiples of this (default 64)."),
    data: Optional[str] = typer.Option(None, help="Training/calibration text (.txt, .jsonl, folder, datasets folder, hub name)."),
    eval_data: Optional[str] = typer.Option(None, help="Held-out evaluation text (default: Austen's Persuasion)."),
    calib_tokens: Optional[int] = typer.Option(None, help="Calibration tokens for wanda-sp/flap."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per calibration/training block (default 512)."),
    eval_tokens: Optional[int] = typer.Option(None, help="Held-out tokens for perplexity."),
    out: Optional[str] = typer.Option(None, help="Output folder (written atomically)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace an existing output folder."),
    seed: Optional[int] = typer.Option(None),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Allow the model's custom code."),
    max_steps: Optional[int] = typer.Option(None, help="MaskPrune: mask-learning steps (default 60)."),
    max_tokens: Optional[int] = typer.Option(None, help="MaskPrune: token budget of mask learning."),
    recovery_steps: Optional[int] = typer.Option(None, help="LoRA + KD recovery steps after slicing (0: none)."),
    resume: Optional[str] = typer.Option(None, help="Continue an interrupted run from its <out>.ckpt folder."),
    config: Optional[str] = ConfigOpt,
) -> None:
    """Prune a model to a uniform shape and write a plain checkpoint with report.json."""
    from pathlib import Path

    from mptool.config import CompressConfig, load_config

    if resume is not None:
        saved = Path(resume) / "compress-config.yaml"
        if not saved.is_file():
            raise MptoolError(f"--resume {resume} is not a mptool checkpoint folder (no compress-config.yaml); "
                              "give the <out>.ckpt folder of an interrupted run")
        from mptool.compress import compress as run

        run(load_config(CompressConfig, saved, {"overwrite": overwrite}), resume=resume)
        return
    cfg = load_config(CompressConfig, config, {
        "model": model, "method": method, "ratio": ratio, "target.kv_heads": kv_heads,
        "target.heads_per_group": heads_per_group, "target.ffn": ffn, "tp": _tp(tp), "ffn_multiple": ffn_multiple, "data.seq_len": seq_len,
        "data.train": data, "data.eval": eval_data, "data.calib_tokens": calib_tokens,
        "ppl.max_tokens": eval_tokens, "out": out, "overwrite": overwrite, "seed": seed,
        "trust_remote_code": trust_remote_code, "maskprune.steps": max_steps,
        "maskprune.max_tokens": max_tokens, "recovery.steps": recovery_steps,
    })
    from mptool.compress import compress as run

    run(cfg)


@app.command(epilog="Example: mptool shapes --ratio 0.5 --tp 1,2,4")
@user_errors
def shapes(
    model: Optional[str] = ModelArg,
    ratio: Optional[float] = typer.Option(None, help="Fraction of prunable parameters to remove (default 0.5)."),
    tp: Optional[str] = typer.Option(None, help="Tensor-parallel sizes every target must support."),
    ffn_multiple: Optional[int] = typer.Option(None, help="FFN widths are multiples of this (default 64)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    config: Optional[str] = ConfigOpt,
) -> None:
    """List the uniform targets near a ratio that every engine accepts, with parameter counts."""
    from mptool.config import ShapesConfig, load_config

    cfg = load_config(ShapesConfig, config, {"model": model, "ratio": ratio, "tp": _tp(tp),
                                             "ffn_multiple": ffn_multiple})
    from mptool.report import shapes_table

    shapes_table(cfg, as_json=json_out)


@app.command(name="eval", epilog="Example: mptool eval runs/smol-25 --tasks tests/data/tasks/austen_mc.yaml")
@user_errors
def eval_(
    model: Optional[str] = ModelArg,
    data: Optional[str] = typer.Option(None, help="Evaluation text (default: Austen's Persuasion)."),
    window: Optional[int] = typer.Option(None, help="Tokens per window (default 1024)."),
    stride: Optional[int] = typer.Option(None, help="Window stride (default = window)."),
    eval_tokens: Optional[int] = typer.Option(None, help="Tokens evaluated (default 16384)."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated lm-eval task names or local task YAML paths."),
    limit: Optional[int] = typer.Option(None, help="Examples per lm-eval task."),
    out: Optional[str] = typer.Option(None, help="Write the JSON results here."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code"),
    config: Optional[str] = ConfigOpt,
) -> None:
    """Held-out perplexity (declared protocol) and optional lm-eval-harness tasks; prints and writes JSON."""
    from mptool.config import EvalConfig, load_config

    cfg = load_config(EvalConfig, config, {
        "model": model, "data": data, "ppl.window": window, "ppl.stride": stride,
        "ppl.max_tokens": eval_tokens, "tasks": tasks.split(",") if tasks else None,
        "limit": limit, "out": out, "trust_remote_code": trust_remote_code,
    })
    from mptool.report import run_eval

    run_eval(cfg)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
