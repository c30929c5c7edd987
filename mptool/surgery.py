"""Physical slicing of a model to a uniform target; the config rewritten in one place.

Kept units are given per layer (:class:`LayerKeep`); the state dict is sliced tensor by tensor
and loaded into a fresh model built from the rewritten config, so the result is exactly what
``from_pretrained`` will rebuild from disk. Slicing with the dense "keep everything" spec is
the identity, which makes the operation idempotent.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mptool.errors import MptoolError
from mptool.families import FamilyAdapter, get_adapter
from mptool.shapes import Dims, Target


@dataclass
class LayerKeep:
    """The units one decoder layer keeps.

    Attributes:
        kv_groups: kept KV-group indices, ascending.
        heads: for each kept group, the kept query-head indices *within* that group (0..R-1).
        ffn: kept FFN channel indices, ascending.
    """

    kv_groups: list[int]
    heads: list[list[int]]
    ffn: list[int]

    def query_heads(self, heads_per_group: int) -> list[int]:
        """Absolute query-head indices kept, in the order the sliced model stores them."""
        return [g * heads_per_group + r for g, rs in zip(self.kv_groups, self.heads) for r in rs]

    def target(self) -> Target:
        return Target(len(self.kv_groups), len(self.heads[0]) if self.heads else 0, len(self.ffn))


def dense_keeps(d: Dims) -> list[LayerKeep]:
    """The identity spec: every unit of every layer kept."""
    return [
        LayerKeep(
            list(range(d.num_kv_heads)),
            [list(range(d.heads_per_group)) for _ in range(d.num_kv_heads)],
            list(range(d.intermediate_size)),
        )
        for _ in range(d.num_layers)
    ]


def check_keeps(d: Dims, keeps: Sequence[LayerKeep]) -> Target:
    """Validate a per-layer spec: in range, no duplicates, the same shape in every layer."""
    if len(keeps) != d.num_layers:
        raise MptoolError(f"keep spec has {len(keeps)} layers, the model has {d.num_layers}")
    targets = {k.target() for k in keeps}
    if len(targets) != 1:
        raise MptoolError(f"keep spec is not uniform across layers: {sorted(map(str, targets))}")
    for i, k in enumerate(keeps):
        if len(k.heads) != len(k.kv_groups) or len({len(h) for h in k.heads}) > 1:
            raise MptoolError(f"layer {i}: every kept KV group must keep the same number of heads")
        ranges = [(k.kv_groups, d.num_kv_heads, "KV group"), (k.ffn, d.intermediate_size, "FFN channel")]
        ranges += [(h, d.heads_per_group, "query head") for h in k.heads]
        for idx, n, what in ranges:
            if len(set(idx)) != len(idx) or any(not 0 <= j < n for j in idx):
                raise MptoolError(f"layer {i}: {what} indices {idx} must be distinct and in [0, {n})")
    return targets.pop()


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(0, idx).contiguous()


def _cols(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(1, idx).contiguous()


def _head_dims(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long)


def slice_state_dict(
    state: dict[str, torch.Tensor], d: Dims, adapter: FamilyAdapter, keeps: Sequence[LayerKeep],
    release: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Return a new state dict with every layer sliced to its kept units. ``release(key)``:
    called as soon as a tensor is sliced, with ``state`` then edited in place and returned, so
    that the caller can free the dense tensor before the next is cut."""
    check_keeps(d, keeps)
    out = state if release is not None else dict(state)
    a = adapter

    def cut(key: str, part: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], idx: torch.Tensor) -> None:
        out[key] = part(out[key], idx)
        if release is not None:
            release(key)

    for i, k in enumerate(keeps):
        p = f"{a.layers}.{i}."
        attn, mlp = f"{p}{a.attn}.", f"{p}{a.mlp}."
        q_idx = _head_dims(k.query_heads(d.heads_per_group), d.head_dim)
        kv_idx = _head_dims(k.kv_groups, d.head_dim)
        ffn_idx = torch.tensor(k.ffn, dtype=torch.long)
        for name, idx in ((a.q, q_idx), (a.k, kv_idx), (a.v, kv_idx)):
            for suffix in ("weight", "bias"):
                key = f"{attn}{name}.{suffix}"
                if key in out:
                    cut(key, _rows, idx)
        cut(f"{attn}{a.o}.weight", _cols, q_idx)
        for name in (a.gate, a.up):
            for suffix in ("weight", "bias"):
                key = f"{mlp}{name}.{suffix}"
                if key in out:
                    cut(key, _rows, ffn_idx)
        cut(f"{mlp}{a.down}.weight", _cols, ffn_idx)
    return out


# Fields a Llama config shares with Mistral; everything else about the math is identical.
_MISTRAL_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
    "tie_word_embeddings", "rope_parameters", "attention_dropout",
)


def pruned_config(config: Any, t: Target) -> Any:
    """The config of the pruned model: new counts, explicit ``head_dim``.

    A Llama target whose head count does not divide ``hidden_size`` is written as Mistral:
    transformers 5.x ``LlamaConfig`` refuses it, and Mistral with ``sliding_window=None``
    computes the same function with the same weight names.
    """
    d = Dims.from_config(config)
    fields = config.to_dict()
    fields.update(t.as_config(), head_dim=d.head_dim)
    if config.model_type == "llama" and config.hidden_size % t.heads:
        if d.qkv_bias or d.o_bias or d.mlp_bias:
            raise MptoolError(
                f"{t.heads} heads do not divide hidden {config.hidden_size} and this Llama model "
                "has biases, which MistralForCausalLM cannot hold; choose a head count dividing "
                f"{config.hidden_size}"
            )
        from transformers import MistralConfig

        kept = {f: fields[f] for f in _MISTRAL_FIELDS if f in fields}
        new = MistralConfig(**kept, sliding_window=None)
    else:
        fields.pop("architectures", None)
        new = type(config).from_dict(fields)
    new.architectures = [get_adapter(new).architecture]
    return new


def materialize(model: Any, keeps: Sequence[LayerKeep], consume: bool = False) -> Any:
    """Return a new model of the right class, sliced to ``keeps`` (the input is not modified,
    unless ``consume``).

    ``consume``: the dense model is used up (its sliced weights are emptied as they are cut, the
    others move to the new model as they are), so the host never holds the dense model and the
    sliced copy together, only the dense one and one sliced tensor: the end of a sharded
    MaskPrune run, where rank 0 holds a 70B model's dense weights (131 GiB in bf16) and would add
    the sliced copy (68 GiB at 50%). The new model is built on the meta device and takes the
    tensors as they are (``assign``), its non-persistent buffers (rotary frequencies) the dense
    model's.

    A meta-device skeleton (a rank that holds no weights) gives the sliced skeleton."""
    from transformers import AutoModelForCausalLM

    d = Dims.from_config(model.config)
    target = check_keeps(d, keeps)
    config = pruned_config(model.config, target)
    dtype = next(model.parameters()).dtype
    if next(model.parameters()).is_meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if consume:
        params = dict(model.named_parameters(remove_duplicate=False))

        def release(key: str) -> None:
            params[key].data = torch.empty(0, dtype=dtype)

        state = slice_state_dict(model.state_dict(), d, get_adapter(model.config), keeps, release=release)
        with torch.device("meta"):
            new = AutoModelForCausalLM.from_config(config, dtype=dtype)
        new.load_state_dict(state, strict=True, assign=True)
        del state
        for name, buf in model.named_buffers():
            owner, _, leaf = name.rpartition(".")
            mod = new.get_submodule(owner)
            if leaf in mod._buffers and mod._buffers[leaf] is not None and mod._buffers[leaf].is_meta:
                mod._buffers[leaf] = buf
        left = [n for n, t in [*new.named_parameters(), *new.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"materialize(consume=True) left tensors on the meta device: {left[:3]}")
    else:
        state = slice_state_dict(model.state_dict(), d, get_adapter(model.config), keeps)
        new = AutoModelForCausalLM.from_config(config, dtype=dtype)
        new.load_state_dict(state, strict=True)
    new.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    return new.eval()


def keeps_to_json(keeps: Sequence[LayerKeep]) -> list[dict[str, Any]]:
    return [asdict(k) for k in keeps]


def keeps_from_json(data: list[dict[str, Any]]) -> list[LayerKeep]:
    return [LayerKeep(**k) for k in data]


def save_keeps(keeps: Sequence[LayerKeep], path: Path) -> None:
    path.write_text(json.dumps(keeps_to_json(keeps)))
