"""The `mptool bench` command: parse, build :class:`BenchConfig`, call :func:`run_bench`.

Registered on the main app with ``app.command(name="bench", epilog=EPILOG)(bench)``. Every
option defaults to None so it only overrides a YAML recipe when given; heavy imports happen
inside the command.
"""

from __future__ import annotations

from typing import Optional

import typer

from mptool.clikit import user_errors
from mptool.errors import MptoolError

EPILOG = ("Example: mptool bench ~/.cache/mptool/smollm2-135m-instruct runs/smol-mp50 "
          "--engine onnxruntime,vllm --out benchmarks/results/bench_smollm2_cpu")


def _ints(flag: str, value: Optional[str]) -> Optional[list[int]]:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise MptoolError(f"{flag} {value!r} must be comma-separated integers, e.g. 1,8,32") from None


def _names(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


@user_errors
def bench(
    dense: Optional[str] = typer.Argument(None, help="Dense model folder (config.json + *.safetensors)."),
    pruned: Optional[str] = typer.Argument(None, help="Pruned model folder of the same family."),
    engine: Optional[str] = typer.Option(None, "--engine", "-e",
                                         help="torch | onnxruntime | vllm, or several comma-separated (default torch)."),
    batch_sizes: Optional[str] = typer.Option(None, help="Comma-separated batch sizes (default 1,8,32)."),
    prompt_lens: Optional[str] = typer.Option(None, help="Comma-separated prompt lengths in tokens (default 128,512)."),
    new_tokens: Optional[int] = typer.Option(None, help="Tokens generated per sequence (default 32)."),
    warmup: Optional[int] = typer.Option(None, help="Untimed runs per sweep cell (default 1)."),
    repeats: Optional[int] = typer.Option(None, help="Timed runs per sweep cell (default 3)."),
    dtype: Optional[str] = typer.Option(None, help="float32 | bfloat16 | float16 (default: torch and "
                                                   "onnxruntime float32, vllm bfloat16)."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda when available)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads per engine (default: every allowed core)."),
    eager: Optional[bool] = typer.Option(None, "--eager", help="vLLM: run eagerly instead of its compiled graph mode."),
    kv_cache_gib: Optional[int] = typer.Option(None, help="vLLM on CPU: GiB for the KV cache (default 2)."),
    cache_dir: Optional[str] = typer.Option(None, help="Engine build cache (default ~/.cache/mptool/bench)."),
    out: Optional[str] = typer.Option(None, help="Output stem: <out>.json, .md, .png (default runs/bench/bench)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the random prompts (default 0)."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Allow the models' custom code."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML recipe; flags override it."),
) -> None:
    """Dense vs pruned in the serving engines: TTFT, decode and throughput against the ideal speed-up."""
    from mptool.benchmarks.config import BenchConfig
    from mptool.config import load_config

    cfg = load_config(BenchConfig, config, {
        "dense": dense, "pruned": pruned, "engines": _names(engine),
        "batch_sizes": _ints("--batch-sizes", batch_sizes), "prompt_lens": _ints("--prompt-lens", prompt_lens),
        "new_tokens": new_tokens, "warmup": warmup, "repeats": repeats, "dtype": dtype,
        "device": device, "threads": threads, "vllm.eager": eager, "vllm.kv_cache_gib": kv_cache_gib,
        "cache_dir": cache_dir, "out": out, "seed": seed, "trust_remote_code": trust_remote_code,
    })
    from mptool.benchmarks.sweep import main_argv, run_bench

    run_bench(cfg, argv=main_argv())


def register(app: typer.Typer) -> None:
    """Add `bench` to a Typer app (the main `mptool` app, or a test's own)."""
    app.command(name="bench", epilog=EPILOG)(bench)


def main() -> None:
    """``python -m mptool.benchmarks.cli DENSE PRUNED ...``: the command without the main app."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(name="bench", epilog=EPILOG)(bench)
    app()


if __name__ == "__main__":
    main()
