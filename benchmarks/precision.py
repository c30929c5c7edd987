"""Why a model's low-precision logits leave fp32's: where the drift comes from, on random ids and on text.

    python -m mptool.benchmarks.precision dense=default p50=runs/cli50 --dtype float16

The exporters refuse an fp16 ONNX export whose logits on their probe (random token ids by default)
leave the fp32 source's by more than ``1e-2 + 0.04 x max|logit|``. This diagnostic says why a
model does that, with the same probes, all in PyTorch on the CPU:

* ``compute``: the whole model in ``--dtype`` against fp32 — max |logit diff| and top-1 agreement,
  on random ids (the exporters' default probe) and on windows of ``--text`` (the held-out
  *Persuasion* by default);
* ``weights``: only the weights rounded to ``--dtype``, computed in fp32 (is it the weights or the
  arithmetic?), in all and per projection type;
* ``layers``: one decoder layer at a time in ``--dtype``, the rest in fp32 (which layers' rounding
  the rest of the network amplifies), on random ids;
* ``massive``: the residual channel with the largest value anywhere (the "massive activation" of
  the model, Sun et al. 2024) and the fraction of positions where it exceeds 10% of that value
  after its layer, on random ids and on text. Pruning and recovery can make a model fire it on
  ordinary random tokens; positions where it half-forms are the ones whose logits move most.

Writes ``benchmarks/results/precision_<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mptool.benchmarks.quality import RESULTS
from mptool.io import write_results

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _InDtype(torch.nn.Module):
    """A decoder layer run in ``dtype`` inside an fp32 model (inputs cast down, outputs back up)."""

    def __init__(self, layer: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer, self.dtype = copy.deepcopy(layer).to(dtype), dtype

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        def low(v: Any) -> Any:
            if torch.is_tensor(v) and v.is_floating_point():
                return v.to(self.dtype)
            return tuple(low(t) for t in v) if isinstance(v, tuple) else v

        out = self.layer(hidden_states.to(self.dtype), *[low(a) for a in args],
                         **{k: low(v) for k, v in kwargs.items()})
        if torch.is_tensor(out):
            return out.float()
        return tuple(o.float() if torch.is_tensor(o) else o for o in out)


@torch.no_grad()
def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def _compare(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"max_abs_diff": round(float((got - ref).abs().max()), 4),
            "top1": round(float((got.argmax(-1) == ref.argmax(-1)).float().mean()), 4),
            "ref_max_abs": round(float(ref.abs().max()), 2)}


@torch.no_grad()
def _residuals(model: Any, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each decoder layer's output (the residual stream after it), ``[layers][batch, seq, hidden]``."""
    states: list[torch.Tensor] = []

    def keep(module: Any, args: Any, out: Any) -> None:
        states.append((out[0] if isinstance(out, tuple) else out).detach().float())

    handles = [layer.register_forward_hook(keep) for layer in model.model.layers]
    try:
        _logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    return states


def massive(model: Any, probes: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The largest residual value over all probes, where it is (layer, channel), and per probe the
    fraction of positions where that channel exceeds 10% of it after that layer."""
    states = {name: _residuals(model, ids) for name, ids in probes.items()}
    best = max(((float(h.abs().max()), layer, int(h.abs().amax((0, 1)).argmax()))
                for hs in states.values() for layer, h in enumerate(hs)))
    peak, layer, channel = best
    frac = {name: round(float((hs[layer][..., channel].abs() > 0.1 * peak).float().mean()), 4)
            for name, hs in states.items()}
    return {"peak": round(peak, 1), "layer": layer, "channel": channel, "fraction_over_10pct": frac}


def diagnose(model: Any, dtype: torch.dtype, probes: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Every figure of the module docstring for one fp32 ``model`` (left as it was)."""
    random_ids = probes["random"]
    refs = {name: _logits(model, ids) for name, ids in probes.items()}
    low = copy.deepcopy(model).to(dtype)
    compute = {name: _compare(_logits(low, ids), refs[name]) for name, ids in probes.items()}
    del low
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def rounded(pick: Any) -> dict[str, float]:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.is_floating_point() and pick(k):
                    v.copy_(state[k].to(dtype).float())
            result = _compare(_logits(model, random_ids), refs["random"])
            model.load_state_dict(state)
        return result

    weights = {"all": rounded(lambda k: True), **{p: rounded(lambda k, p=p: p in k) for p in PROJECTIONS}}
    layers = []
    decoder = model.model.layers
    for i in range(len(decoder)):
        original = decoder[i]
        decoder[i] = _InDtype(original, dtype)
        try:
            layers.append(_compare(_logits(model, random_ids), refs["random"])["max_abs_diff"])
        finally:
            decoder[i] = original
    return {"compute": compute, "weights": weights, "layers": layers, "massive": massive(model, probes)}


def markdown(result: dict[str, Any]) -> str:
    dt = result["dtype"]
    lines = [f"Made by `{result['command']}`; {dt} against fp32, PyTorch on the CPU. Probes: random ids "
             f"{result['probes']['random']}, text windows {result['probes']['text']} of {result['text']}.", "",
             f"| model | {dt}, random ids: max diff / top-1 | {dt}, text: max diff / top-1 | weights only rounded "
             "| worst single layer in " + dt + " | massive activation (layer, channel, peak) | fires on random / text |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for name, r in result["models"].items():
        c, m = r["compute"], r["massive"]
        worst = max(range(len(r["layers"])), key=lambda i: r["layers"][i])
        lines.append(f"| {name} | {c['random']['max_abs_diff']:.3g} / {c['random']['top1']:.1%} | "
                     f"{c['text']['max_abs_diff']:.3g} / {c['text']['top1']:.1%} | "
                     f"{r['weights']['all']['max_abs_diff']:.3g} | layer {worst}: {r['layers'][worst]:.3g} | "
                     f"{m['layer']}, {m['channel']}, {m['peak']:,.0f} | "
                     f"{m['fraction_over_10pct']['random']:.1%} / {m['fraction_over_10pct']['text']:.1%} |")
    lines += ["", "Per layer in " + dt + " alone (max |logit diff| on random ids):", ""]
    for name, r in result["models"].items():
        lines.append(f"- {name}: " + ", ".join(f"{v:.2g}" for v in r["layers"]))
    lines += ["", "Weights alone rounded, per projection type (max |logit diff| on random ids):", ""]
    for name, r in result["models"].items():
        lines.append(f"- {name}: " + ", ".join(f"{p} {r['weights'][p]['max_abs_diff']:.2g}" for p in PROJECTIONS))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from mptool.benchmarks.exports import parse_model
    from mptool.data import _encode, default_texts, load_texts
    from mptool.errors import MptoolError
    from mptool.exporters.common import PROBE_TOKENS, probe_ids, random_ids
    from mptool.models import load_model

    ap = argparse.ArgumentParser(prog="python -m mptool.benchmarks.precision", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="LABEL=FOLDER (dense=default: the embedded SmolLM2-135M)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--text", default=None, help="text for the text probe (default: the held-out Persuasion)")
    ap.add_argument("--random-shape", default="4x64", help="random-id probe, BATCHxLEN (default %(default)s)")
    ap.add_argument("--text-shape", default="4x256", help="text probe, BATCHxLEN (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--tag", default="smollm2")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    try:
        models = [parse_model(m) for m in args.models]
        shapes = {k: tuple(int(x) for x in getattr(args, f"{k}_shape").split("x")) for k in ("random", "text")}
        if any(len(s) != 2 or min(s) < 1 for s in shapes.values()):
            raise ValueError("probe shapes are BATCHxLEN with positive sizes, e.g. 4x64")
        # read once, before any model loads (a bad path is refused here); tokenized per model
        text = default_texts()[1] if args.text is None else "\n\n".join(load_texts(args.text, role="eval"))
    except (ValueError, MptoolError) as exc:
        ap.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    out: dict[str, Any] = {}
    text_name = args.text or "austen:persuasion (held out)"
    for label, path in models:
        model, tokenizer = load_model(path, dtype=torch.float32)
        stream = _encode(tokenizer, text, PROBE_TOKENS)
        probes = {"random": random_ids(tokenizer, model.config, shapes["random"], args.seed),
                  "text": probe_ids(tokenizer, model.config, shapes["text"], args.seed, stream)}
        out[label] = diagnose(model, dtype, probes)
        print(f"{label}: {json.dumps(out[label]['compute'])}", flush=True)
        del model
    given = list(sys.argv[1:] if argv is None else argv)
    result = {"benchmark": "precision", "command": " ".join(["python -m mptool.benchmarks.precision", *given]),
              "dtype": args.dtype, "text": text_name,
              "probes": {k: f"{s[0]}x{s[1]}" for k, s in shapes.items()}, "seed": args.seed,
              "torch_threads": torch.get_num_threads(), "wall_s": round(time.perf_counter() - started, 1),
              "models": out}
    table = markdown(result)
    write_results(Path(args.results) / f"precision_{args.tag}", result, table)
    print(table)
    return result


if __name__ == "__main__":
    main()
