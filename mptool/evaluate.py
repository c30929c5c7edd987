"""Held-out perplexity with a declared protocol, and lm-eval-harness tasks."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mptool.errors import MptoolError


@dataclass(frozen=True)
class PplProtocol:
    """How perplexity is measured; written next to every number it produces.

    Attributes:
        window: tokens per forward pass (the context length).
        stride: tokens the window advances. With ``stride < window`` every token after the
            first is scored once, with up to ``window - stride`` tokens of extra context; with
            ``stride == window`` (the default) each window's first token has no context and is
            not scored (``tokens`` in the result counts what was).
        max_tokens: tokens of the evaluation text used (from its start).
        text: a name for the text (e.g. ``austen:persuasion``).
    """

    window: int = 1024
    stride: int = 1024
    max_tokens: int = 16384
    text: str = "austen:persuasion"


def windows(n: int, protocol: PplProtocol) -> list[tuple[int, int, int]]:
    """The forward passes of ``protocol`` over ``n`` tokens: (begin, end, tokens newly scored)."""
    out, prev_end = [], 0
    for begin in range(0, n, protocol.stride):
        end = min(begin + protocol.window, n)
        out.append((begin, end, end - prev_end))  # tokens not scored by an earlier window
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, protocol: PplProtocol,
               progress: Callable[[int], None] | None = None, split: bool = False) -> dict[str, Any]:
    """Perplexity of ``model`` on the 1-D token stream ``ids`` under ``protocol``.

    ``split``: every process of a multi-process run calls this, runs a share of the windows
    (round-robin; one that runs out repeats a window, unscored, so that an FSDP model's
    collectives stay in step) and gets the total: the whole model never has to fit one device.

    Returns a JSON-able dict: ``ppl``, ``nll`` (mean per scored token), ``tokens`` (scored),
    the protocol, and the wall time.
    """
    from mptool import distributed as D

    if protocol.stride > protocol.window or protocol.stride < 1:
        raise MptoolError(f"stride {protocol.stride} must be in [1, window={protocol.window}]")
    ids = ids[: protocol.max_tokens]
    if ids.numel() < 2:
        raise MptoolError("evaluation text has fewer than 2 tokens")
    device = next(model.parameters()).device
    start_time = time.perf_counter()
    ranks, rank = (D.world_size(), D.rank()) if split else (1, 0)
    todo = windows(ids.numel(), protocol)
    nll_sum, scored = 0.0, 0
    for first in range(0, len(todo), ranks):
        turn = todo[first:first + ranks]
        begin, end, new = turn[rank] if rank < len(turn) else todo[0]
        chunk = ids[begin:end].unsqueeze(0).to(device)
        logits = model(chunk).logits[0, :-1].float()
        if rank < len(turn):
            losses = torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="none")
            take = losses[-new:] if begin else losses  # the first token has no prediction
            nll_sum += take.double().sum().item()
            scored += take.numel()
        if progress:
            progress(sum(w[2] for w in turn))
    if ranks > 1:
        total = torch.tensor([nll_sum, scored], dtype=torch.float64)
        nll_sum, scored = D.sum_(total).tolist()
        scored = int(scored)
    nll = nll_sum / scored
    if not math.isfinite(nll):
        raise MptoolError(f"the model's logits are not finite (mean NLL {nll}): {nonfinite_note(model)}")
    return {"ppl": math.exp(nll), "nll": nll, "tokens": scored, "protocol": asdict(protocol),
            "seconds": round(time.perf_counter() - start_time, 2)}


def nonfinite_note(model: Any) -> str:
    """Where a model's non-finite outputs come from, in a few words: the weights that hold NaN or
    Inf (this process's shards under FSDP), or activations beyond the dtype's range."""
    from mptool.models import nonfinite_weights

    if bad := nonfinite_weights(model):
        return f"the weights hold {bad}"
    return "the weights are finite, so activations overflow the model's dtype; run it in float32"


def _task_loader() -> Any:
    """A YAML loader for lm-eval task files: their ``!function`` (and other) tags are not ours to
    run; only the ``task`` / ``group`` names are read."""
    import yaml

    class TaskLoader(yaml.SafeLoader):
        pass

    TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return TaskLoader


def resolve_tasks(tasks: Sequence[str]) -> tuple[Any, list[str]]:
    """(lm-eval TaskManager, task names) for ``tasks``, checked before any model is loaded.

    Each entry is a registered task name (hub data; needs network) or a path to a local task
    YAML file or a folder of them (offline), whose task (or group) names are then used.

    Raises:
        MptoolError: lm-eval missing, a task file missing or unreadable, or a name lm-eval does
            not know (the message lists them).
    """
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:  # pragma: no cover - part of the standard environment
        raise MptoolError(f"--tasks needs lm-eval: pip install 'lm_eval[hf]==0.4.13' ({e})") from e
    import yaml

    include, names, local = [], [], {}
    for task in tasks:
        if not str(task).strip():
            raise MptoolError(f"--tasks {','.join(map(str, tasks))!r} has an empty entry; give comma-separated "
                              "task names or task YAML paths")
        path = Path(task)
        if path.suffix in (".yaml", ".yml") or path.is_dir():
            if not path.exists():
                raise MptoolError(f"task file {task} does not exist; give a task YAML or a registered task name")
            include.append(str(path if path.is_dir() else path.parent))
            files = sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
            for f in files:
                try:
                    spec = yaml.load(f.read_text(), Loader=_task_loader()) or {}
                except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
                    raise MptoolError(f"task file {f} is not readable YAML: {str(e).splitlines()[0]}") from None
                if not isinstance(spec, dict):
                    continue
                if isinstance(spec.get("group"), str) and isinstance(spec.get("task"), list):
                    names.append(spec["group"])  # a group file: run the group
                    local[spec["group"]] = f
                elif isinstance(spec.get("task"), str):
                    names.append(spec["task"])
                    local[spec["task"]] = f
        else:
            names.append(task)
    if not names:
        raise MptoolError(f"no lm-eval task found in {list(tasks)}")
    manager = TaskManager(include_path=include or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise MptoolError(f"lm-eval knows no task {', '.join(map(repr, unknown))}; give a registered task "
                          "name (lm-eval --tasks list) or a task YAML file")
    registered = [n for n in names if n not in local]
    if registered:  # their data sets come from the hub: say so at once, not after the perplexity run
        from mptool.models import hub_unreachable

        if why := hub_unreachable(reads_cache=True):
            raise MptoolError(f"lm-eval task {', '.join(map(repr, registered))} loads its data set from the hub, "
                              f"and {why} (HF_HUB_OFFLINE=1 reads a cached copy); offline, give a local task "
                              "YAML (see tests/data/tasks/austen_mc.yaml)")
    for name in names:  # build every task now (its data set downloaded or read), not after the perplexity run
        try:
            manager.load(name)
        except Exception as e:  # noqa: BLE001 - lm-eval raises bare TypeErrors for an incomplete file
            why = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__
            if name not in local:
                raise MptoolError(f"lm-eval cannot build task {name!r} ({why}); online, or with its data set "
                                  "in the cache (HF_HUB_OFFLINE=1), or give a local task YAML") from None
            hint = (f"paths in a task YAML (dataset_kwargs.data_files) are read from the working directory, "
                    f"{Path.cwd()}" if isinstance(e, FileNotFoundError) else
                    "a task YAML needs task, dataset_path, output_type, doc_to_text and doc_to_target "
                    "(see tests/data/tasks/austen_mc.yaml)")
            raise MptoolError(f"lm-eval cannot build task {name!r} from {local[name]} ({why}); {hint}") from None
    return manager, names


def run_tasks(model_dir: str | Path, resolved: tuple[Any, list[str]], limit: int | None = None,
              batch_size: int = 8) -> dict[str, Any]:
    """Run lm-eval-harness tasks on a model folder; ``resolved`` is :func:`resolve_tasks`' result
    (made before the model is loaded, so that a bad task name costs nothing)."""
    from lm_eval import simple_evaluate

    manager, names = resolved
    try:
        results = simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": "float32"},
            tasks=names,
            batch_size=batch_size,
            device="cpu",
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
        )
    except Exception as e:  # noqa: BLE001 - lm-eval's own failures (data, network) are one line
        raise MptoolError(f"lm-eval failed on {', '.join(names)}: {type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0]}") from e
    if results is None:  # non-zero ranks in distributed runs
        return {}
    return {name: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for name, metrics in results["results"].items()}
