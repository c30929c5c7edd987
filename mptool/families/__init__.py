"""One small adapter per model family: where the prunable units live.

The four supported families share Hugging Face's module naming, so an adapter is data, not code:
the module names of the attention and MLP projections, whether q/k/v carry biases (Qwen2) and
whether queries and keys are normalised per head (Qwen3; those norms act on ``head_dim`` and are
shared by all heads, so pruning heads leaves them untouched).

Prunable units per decoder layer:

* KV groups ``g = 0..G-1`` (``G = num_key_value_heads``); group ``g`` owns query heads
  ``g*R .. g*R+R-1`` with ``R = num_attention_heads // G`` (Hugging Face's ``repeat_kv`` layout).
* query heads inside each group (every kept group keeps the same count ``R'``).
* FFN channels ``c = 0..I-1`` (rows of gate/up, columns of down).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mptool.errors import MptoolError


@dataclass(frozen=True)
class FamilyAdapter:
    """Where one family keeps its prunable projections.

    Attributes:
        model_type: the ``config.model_type`` it handles.
        architecture: the ``*ForCausalLM`` class name written into ``config.architectures``.
        layers: attribute path from the causal-LM module to the list of decoder layers.
        attn: attribute name of the attention block inside a decoder layer.
        mlp: attribute name of the MLP block inside a decoder layer.
        qkv_bias: whether q/k/v projections always carry biases (Qwen2).
        qk_norm: whether queries and keys are RMS-normalised per head (Qwen3).
    """

    model_type: str
    architecture: str
    layers: str = "model.layers"
    attn: str = "self_attn"
    mlp: str = "mlp"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    qkv_bias: bool = False
    qk_norm: bool = False

    def decoder_layers(self, model: Any) -> list[Any]:
        obj = model
        for name in self.layers.split("."):
            obj = getattr(obj, name)
        return list(obj)

    def attention(self, layer: Any) -> Any:
        return getattr(layer, self.attn)

    def ffn(self, layer: Any) -> Any:
        return getattr(layer, self.mlp)


ADAPTERS: dict[str, FamilyAdapter] = {
    "llama": FamilyAdapter("llama", "LlamaForCausalLM"),
    "mistral": FamilyAdapter("mistral", "MistralForCausalLM"),
    "qwen2": FamilyAdapter("qwen2", "Qwen2ForCausalLM", qkv_bias=True),
    "qwen3": FamilyAdapter("qwen3", "Qwen3ForCausalLM", qk_norm=True),
}

SUPPORTED = ", ".join(sorted(ADAPTERS))


def get_adapter(config_or_type: Any) -> FamilyAdapter:
    """Return the adapter for a config (or a ``model_type`` string); refuse anything else."""
    model_type = config_or_type if isinstance(config_or_type, str) else getattr(
        config_or_type, "model_type", None
    )
    if model_type not in ADAPTERS:
        raise MptoolError(
            f"unsupported architecture {model_type!r}: mptool prunes decoder-only models of the "
            f"families {SUPPORTED} (dense FFN, grouped-query attention)"
        )
    return ADAPTERS[model_type]
