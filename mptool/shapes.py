"""Uniform target shapes, parameter counts and the engine-legality rules, kept as data.

A *target* is the per-layer shape every decoder layer will have after pruning: the number of KV
groups kept, the query heads kept per group and the FFN width. ``head_dim``, the hidden size,
the vocabulary and the depth never change, so the result stays a plain checkpoint of its family.

Each legality rule is a :class:`Rule` in :data:`RULES` with the engine that imposes it and the
reason; :func:`check` returns the reasons a target is refused, :func:`nearest_legal` the legal
targets closest in parameter count, :func:`candidates` the legal targets near a ratio.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

from mptool.errors import MptoolError
from mptool.families import get_adapter


def sizes_problem(sizes: dict[str, Any]) -> str | None:
    """What makes a config's sizes describe no model (0 heads, 3 KV groups for 8 heads), in one
    line; None when they are usable. ``sizes``: config.json's values by name."""
    heads = sizes.get("num_attention_heads")
    kv = sizes.get("num_key_value_heads")
    kv = heads if kv is None else kv
    values = {name: sizes.get(name) for name in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "intermediate_size", "vocab_size")}
    values["num_key_value_heads"] = kv
    if sizes.get("head_dim") is not None:  # absent or null: hidden_size / heads
        values["head_dim"] = sizes["head_dim"]
    bad = [f"{k} {v!r}" for k, v in values.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        return f"{', '.join(bad)}; each must be a whole number >= 1"
    if heads % kv:
        return (f"num_attention_heads {heads}, not a multiple of num_key_value_heads {kv}: every KV group "
                "must serve the same number of query heads")
    return None


@dataclass(frozen=True)
class Dims:
    """The shape facts of a model config that pruning and counting need."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    context: int | None = None
    """max_position_embeddings: the longest sequence the model was built for (None: not declared)."""

    @classmethod
    def from_config(cls, config: Any) -> "Dims":
        adapter = get_adapter(config)
        heads = config.num_attention_heads
        names = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "head_dim")
        if problem := sizes_problem({n: getattr(config, n, None) for n in names}):
            where = getattr(config, "_name_or_path", "") or "the model"
            raise MptoolError(f"config.json of {where} has {problem}")
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            model_type=config.model_type,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=adapter.qkv_bias or attention_bias,
            o_bias=attention_bias and not adapter.qkv_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=adapter.qk_norm,
            context=getattr(config, "max_position_embeddings", None),
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def dense_target(self) -> "Target":
        return Target(self.num_kv_heads, self.heads_per_group, self.intermediate_size)


@dataclass(frozen=True, order=True)
class Target:
    """The uniform per-layer shape: KV groups kept, query heads per group, FFN channels."""

    kv_heads: int
    heads_per_group: int
    ffn: int

    @property
    def heads(self) -> int:
        return self.kv_heads * self.heads_per_group

    def as_config(self) -> dict[str, int]:
        return {
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "intermediate_size": self.ffn,
        }

    def __str__(self) -> str:
        return f"kv_heads={self.kv_heads} heads_per_group={self.heads_per_group} ffn={self.ffn}"


# ---------------------------------------------------------------- parameter counts


def attention_params(d: Dims, kv_heads: float, heads: float) -> float:
    """Prunable attention parameters of one layer (q, k, v, o weights and the q/k/v biases)."""
    hd, h = d.head_dim, d.hidden_size
    q = h * heads * hd + (heads * hd if d.qkv_bias else 0)
    kv = 2 * (h * kv_heads * hd + (kv_heads * hd if d.qkv_bias else 0))
    o = heads * hd * h
    return q + kv + o


def ffn_params(d: Dims, ffn: float) -> float:
    """Prunable FFN parameters of one layer (gate, up, down weights and gate/up biases)."""
    return 3 * d.hidden_size * ffn + (2 * ffn if d.mlp_bias else 0)


def prunable_params(d: Dims, t: Target) -> int:
    """Prunable parameters of the whole model at target ``t``."""
    per_layer = attention_params(d, t.kv_heads, t.heads) + ffn_params(d, t.ffn)
    return int(d.num_layers * per_layer)


def fixed_params(d: Dims) -> int:
    """Parameters pruning never touches: embeddings, LM head, norms, o/down biases."""
    h = d.hidden_size
    per_layer = 2 * h + (2 * d.head_dim if d.qk_norm else 0)
    per_layer += h if d.o_bias else 0
    per_layer += h if d.mlp_bias else 0
    head = 0 if d.tied else d.vocab_size * h
    return d.vocab_size * h + head + h + d.num_layers * per_layer


def total_params(d: Dims, t: Target | None = None) -> int:
    """Total parameter count of the model at target ``t`` (dense when ``None``)."""
    return fixed_params(d) + prunable_params(d, t or d.dense_target())


def kept_fraction(d: Dims, t: Target) -> float:
    return prunable_params(d, t) / prunable_params(d, d.dense_target())


# ---------------------------------------------------------------- legality rules as data


@dataclass(frozen=True)
class Rule:
    """One engine's constraint on a uniform target.

    ``check(d, t, tp)`` returns ``None`` when the target is accepted, else the reason.
    """

    name: str
    engine: str
    doc: str
    check: Callable[[Dims, Target, int], str | None]


def _kv_tp(d: Dims, t: Target, tp: int) -> str | None:
    if t.kv_heads >= tp and t.kv_heads % tp:
        return f"vLLM tensor parallel {tp}: {t.kv_heads} KV heads are not divisible by {tp}"
    if t.kv_heads < tp and tp % t.kv_heads:
        return f"vLLM tensor parallel {tp}: {tp} is not a multiple of {t.kv_heads} KV heads"
    return None


# head sizes vLLM's CPU attention backend supports (vllm/v1/attention/backends/cpu_attn.py).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

RULES: tuple[Rule, ...] = (
    Rule(
        "positive",
        "all",
        "every kept count is at least 1",
        lambda d, t, tp: None
        if min(t.kv_heads, t.heads_per_group, t.ffn) >= 1
        else f"every count must be >= 1, got {t}",
    ),
    Rule(
        "within_dense",
        "all",
        "a target cannot exceed the dense model",
        lambda d, t, tp: None
        if t.kv_heads <= d.num_kv_heads
        and t.heads_per_group <= d.heads_per_group
        and t.ffn <= d.intermediate_size
        else f"target {t} exceeds the dense model {d.dense_target()}",
    ),
    Rule(
        "gqa_integer_ratio",
        "all",
        "num_attention_heads % num_key_value_heads == 0 (every KV group keeps the same heads)",
        lambda d, t, tp: None if t.heads % t.kv_heads == 0 else "heads not divisible by KV heads",
    ),
    Rule(
        "ffn_multiple",
        "kernels",
        "FFN width a multiple of the kernel tile (64 by default; --ffn-multiple)",
        None,  # type: ignore[arg-type]  # filled by check(): it needs the multiple
    ),
    Rule(
        "tp_heads",
        "vllm",
        "tensor parallel t: num_attention_heads % t == 0",
        lambda d, t, tp: None
        if t.heads % tp == 0
        else f"vLLM tensor parallel {tp}: {t.heads} attention heads are not divisible by {tp}",
    ),
    Rule(
        "tp_kv_heads",
        "vllm",
        "tensor parallel t: KV heads % t == 0 when KV >= t, else t % KV == 0",
        _kv_tp,
    ),
    Rule(
        "tp_ffn",
        "vllm",
        "tensor parallel t: intermediate_size % t == 0",
        lambda d, t, tp: None
        if t.ffn % tp == 0
        else f"vLLM tensor parallel {tp}: FFN {t.ffn} is not divisible by {tp}",
    ),
    Rule(
        "vllm_cpu_head_size",
        "vllm-cpu",
        f"vLLM's CPU attention supports head sizes {VLLM_CPU_HEAD_SIZES} (16 is refused)",
        lambda d, t, tp: None
        if d.head_dim in VLLM_CPU_HEAD_SIZES
        else f"vLLM CPU attention refuses head_dim {d.head_dim}",
    ),
    Rule(
        "llama_bias_as_mistral",
        "transformers",
        "a Llama target whose head count does not divide hidden_size is written as Mistral "
        "(LlamaConfig rejects it); Mistral has no attention or MLP bias, so that needs attention_bias "
        "and mlp_bias off",
        lambda d, t, tp: None
        if not (d.model_type == "llama" and d.hidden_size % t.heads and (d.qkv_bias or d.o_bias or d.mlp_bias))
        else f"{t.heads} heads do not divide hidden {d.hidden_size} and the Llama model has "
        "attention or MLP biases, which the Mistral architecture cannot hold",
    ),
)


# Rules applied unless the caller names engines: vLLM-CPU's head-size rule is about the dense
# model (pruning never changes head_dim), so it is checked only where a CPU vLLM load is asked.
DEFAULT_ENGINES = ("all", "kernels", "vllm", "transformers")


def check(d: Dims, t: Target, tp: Iterable[int] = (1,), ffn_multiple: int = 64,
          engines: Iterable[str] | None = None) -> list[str]:
    """Return every reason ``t`` is refused (empty when legal for all ``tp`` sizes).

    Args:
        d: the dense model's dims.
        t: the uniform target.
        tp: tensor-parallel sizes the checkpoint must support in vLLM.
        ffn_multiple: the FFN width must be a multiple of this (or equal the dense width).
        engines: apply the rules of these engines (``None``: :data:`DEFAULT_ENGINES`).
    """
    wanted = set(DEFAULT_ENGINES if engines is None else engines) | {"all"}
    problems: list[str] = []
    for rule in RULES:
        if rule.engine not in wanted:
            continue
        if rule.name == "ffn_multiple":
            if t.ffn % ffn_multiple and t.ffn != d.intermediate_size:
                problems.append(f"FFN {t.ffn} is not a multiple of {ffn_multiple}")
            continue
        if rule.engine == "vllm":
            for size in tp:
                reason = rule.check(d, t, size)
                if reason:
                    problems.append(reason)
            continue
        reason = rule.check(d, t, 1)
        if reason:
            problems.append(reason)
            if rule.engine == "all":  # a structural failure makes the other rules noise
                break
    return list(dict.fromkeys(problems))


def is_legal(d: Dims, t: Target, tp: Iterable[int] = (1,), ffn_multiple: int = 64) -> bool:
    return not check(d, t, tp, ffn_multiple)


def all_legal(d: Dims, tp: Iterable[int] = (1,), ffn_multiple: int = 64) -> list[Target]:
    """Every legal uniform target of a model, smallest first."""
    tp = tuple(tp)
    widths = list(range(ffn_multiple, d.intermediate_size + 1, ffn_multiple))
    if d.intermediate_size not in widths:
        widths.append(d.intermediate_size)
    out = [
        Target(g, r, f)
        for g in range(1, d.num_kv_heads + 1)
        for r in range(1, d.heads_per_group + 1)
        for f in widths
    ]
    out = [t for t in out if is_legal(d, t, tp, ffn_multiple)]
    return sorted(out, key=lambda t: prunable_params(d, t))


def nearest_legal(d: Dims, t: Target, tp: Iterable[int] = (1,), ffn_multiple: int = 64,
                  n: int = 3) -> list[Target]:
    """The ``n`` legal targets closest to ``t`` (by prunable parameters, then by shape)."""
    want = prunable_params(d, t)
    legal = [c for c in all_legal(d, tp, ffn_multiple) if c != d.dense_target()]
    return sorted(
        legal,
        key=lambda c: (
            abs(prunable_params(d, c) - want),
            abs(c.kv_heads - t.kv_heads) + abs(c.heads_per_group - t.heads_per_group),
        ),
    )[:n]


def validate_target(d: Dims, t: Target, tp: Iterable[int] = (1,), ffn_multiple: int = 64) -> None:
    """Raise a one-line :class:`MptoolError` naming the problems and the nearest legal targets."""
    problems = check(d, t, tp, ffn_multiple)
    if not problems:
        return
    near = nearest_legal(d, t, tp, ffn_multiple)
    hint = "; ".join(f"({n})" for n in near) if near else "none"
    raise MptoolError(f"illegal target {t}: {'; '.join(problems)}. Nearest legal: {hint}")


def option_problems(tp: list[int] | None, ffn_multiple: int | None = None, tp_name: str = "--tp",
                    allow_no_tp: bool = False) -> list[str]:
    """What is wrong with the target options every command shares: tensor-parallel sizes (none
    at all only where ``allow_no_tp``) and the FFN multiple, one line each."""
    problems = []
    if tp is not None and ((not tp and not allow_no_tp) or any(t < 1 for t in tp)):
        problems.append(f"{tp_name} {tp} must list positive tensor-parallel sizes, e.g. 1,2,4"
                        + (" (or [] for none)" if allow_no_tp else ""))
    if ffn_multiple is not None and ffn_multiple < 1:
        problems.append(f"--ffn-multiple {ffn_multiple} must be >= 1")
    return problems


def check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise MptoolError(
            f"--ratio {ratio} is outside (0, 1): give the fraction of prunable parameters to "
            "remove, e.g. 0.25 or 0.5"
        )


def candidates(d: Dims, ratio: float, tp: Iterable[int] = (1,), ffn_multiple: int = 64) -> list[Target]:
    """Legal targets at a pruning ratio: for each attention shape, the widest FFN in budget.

    ``ratio`` is the fraction of prunable parameters removed; each returned target keeps at most
    ``1 - ratio`` of them. Sorted by kept parameters, largest (closest to the budget) first.
    """
    check_ratio(ratio)
    budget = (1.0 - ratio) * prunable_params(d, d.dense_target())
    best: dict[tuple[int, int], Target] = {}
    for t in all_legal(d, tp, ffn_multiple):
        if prunable_params(d, t) <= budget:
            key = (t.kv_heads, t.heads_per_group)
            if key not in best or t.ffn > best[key].ffn:
                best[key] = t
    return sorted(best.values(), key=lambda t: -prunable_params(d, t))


def no_target_message(d: Dims, budget: float, tp: Iterable[int] = (1,), ffn_multiple: int = 64) -> str:
    """Why no legal target fits ``budget`` prunable parameters, and what would (one line)."""
    tp = tuple(tp)
    sizes = ",".join(map(str, tp))
    legal = all_legal(d, tp, ffn_multiple)
    if not legal:
        return _no_shape_at_all(d, tp, ffn_multiple)
    dense = prunable_params(d, d.dense_target())
    smallest = min(prunable_params(d, t) for t in legal)
    largest_ratio = math.floor((1 - smallest / dense) * 1000) / 1000
    if largest_ratio <= 0:  # only (about) the dense shape is legal: --ratio must be > 0, so it cannot help
        return (f"no legal target smaller than the dense shape with tp {sizes} and FFN multiple {ffn_multiple}, at "
                "any ratio; give a smaller --ffn-multiple or other tp sizes")
    return (f"no legal target keeps at most {budget / dense:.1%} of prunable parameters with tp {sizes} and FFN "
            f"multiple {ffn_multiple}: the smallest legal one keeps {smallest / dense:.1%}, so give --ratio "
            f"{largest_ratio:g} or less")


def _no_shape_at_all(d: Dims, tp: tuple[int, ...], ffn_multiple: int) -> str:
    """Why not one target is legal: the head counts, or no FFN width both a multiple of
    ``ffn_multiple`` (or the dense width) and divisible by every tp size."""
    sizes = ",".join(map(str, tp))
    heads_ok = any(not [p for p in check(d, Target(g, r, d.intermediate_size), tp, ffn_multiple) if "FFN" not in p]
                   for g in range(1, d.num_kv_heads + 1) for r in range(1, d.heads_per_group + 1))
    if not heads_ok:
        return (f"no uniform shape of this model ({d.num_heads} query heads, {d.num_kv_heads} KV heads) loads with "
                f"tp {sizes} at any ratio; drop the tp sizes that do not divide its head counts")
    step = math.lcm(*tp)
    finer = next((m for m in (ffn_multiple >> k for k in range(1, ffn_multiple.bit_length()))
                  if m and math.lcm(m, step) <= d.intermediate_size), None)
    hint = f"give --ffn-multiple {finer} or less" if finer else "give other tp sizes"
    return (f"no FFN width of this model (dense {d.intermediate_size}) is both a multiple of {ffn_multiple} and "
            f"divisible by tp {sizes}; {hint}")


def balanced_target(d: Dims, ratio: float, tp: Iterable[int] = (1,), ffn_multiple: int = 64) -> Target:
    """The fixed-rule split one-shot baselines use for ``--ratio``.

    Among legal targets within the budget (and using at least 95% of it when possible), pick the
    one whose kept attention fraction is closest to its kept FFN fraction, preferring more KV
    groups: the classic "same fraction of every unit type" rule, snapped to legal shapes.
    """
    cands = candidates(d, ratio, tp, ffn_multiple)
    budget = (1.0 - ratio) * prunable_params(d, d.dense_target())
    if not cands:
        raise MptoolError(no_target_message(d, budget, tp, ffn_multiple))
    full = [c for c in cands if prunable_params(d, c) >= 0.95 * budget] or cands
    dense_attn = attention_params(d, d.num_kv_heads, d.num_heads)

    def imbalance(c: Target) -> tuple[float, int]:
        attn = attention_params(d, c.kv_heads, c.heads) / dense_attn
        ffn = c.ffn / d.intermediate_size
        return (abs(attn - ffn), -c.kv_heads)

    return min(full, key=imbalance)


def describe(d: Dims, t: Target) -> dict[str, Any]:
    """A JSON-able summary of a target: shape, parameter counts, kept fraction."""
    return {
        **asdict(t),
        "num_attention_heads": t.heads,
        "head_dim": d.head_dim,
        "prunable_params": prunable_params(d, t),
        "total_params": total_params(d, t),
        "prunable_kept": round(kept_fraction(d, t), 4),
    }


def continuous_params(d: Dims, kv_heads: float, heads_per_group: float, ffn: float) -> float:
    """Prunable parameters at a continuous (relaxed) target, for the budget constraint P(s)."""
    return d.num_layers * (attention_params(d, kv_heads, kv_heads * heads_per_group) + ffn_params(d, ffn))


def snap(d: Dims, kv_heads: float, heads_per_group: float, ffn: float, budget: float,
         tp: Iterable[int] = (1,), ffn_multiple: int = 64) -> Target:
    """The legal target within ``budget`` (prunable parameters) nearest a continuous target.

    Distance is measured in fractions of each dense size, so no unit type dominates; ties go
    to the target that keeps more parameters.
    """
    legal = [t for t in all_legal(d, tp, ffn_multiple) if prunable_params(d, t) <= budget]
    if not legal:
        raise MptoolError(no_target_message(d, budget, tp, ffn_multiple))

    def distance(t: Target) -> tuple[float, float]:
        return (((t.kv_heads - kv_heads) / d.num_kv_heads) ** 2
                + ((t.heads_per_group - heads_per_group) / d.heads_per_group) ** 2
                + ((t.ffn - ffn) / d.intermediate_size) ** 2, -prunable_params(d, t))

    return min(legal, key=distance)


def gram_bytes(d: Dims, shares: int = 1) -> int:
    """Host memory of the input Gram matrices (float64) of every o_proj and down_proj that
    compensation (:mod:`mptool.compensate`) computes from; with ``shares``, of one process's share
    when the layers are dealt round-robin over that many processes (the most any one holds)."""
    return -(-d.num_layers // shares) * ((d.num_heads * d.head_dim) ** 2 + d.intermediate_size ** 2) * 8
