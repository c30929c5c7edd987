"""The ideal speed-up of a pruned model over its dense parent, counted from the two shapes.

Pure arithmetic on :class:`mptool.shapes.Dims`; no engine, no timing. Two physical limits:

* **Prefill** is bound by compute. :func:`prefill_flops` counts the multiply-adds of one prompt of
  ``P`` tokens: ``2 x`` every decoder matmul weight per token, the attention scores and values
  (causal: query ``i`` meets ``i + 1`` keys), and the LM head on the last token only (the one
  whose logits pick the first new token). Norms, rotary embeddings, softmax and the embedding
  gather are left out: they are a rounding error next to the matmuls.
* **Decode** is bound by memory traffic. :func:`decode_bytes_per_step` counts the bytes one decode
  step must read: every weight once (shared by the whole batch; the LM head included; of the
  embedding table only the ``B`` rows looked up, unless it is tied to the LM head and read whole
  anyway), plus each sequence's KV cache at its context length. Per output token that is divided
  by the batch size.

The ideal speed-up of a figure is dense ÷ pruned of its count; an engine that turns every saved
FLOP or byte into saved time reaches it, so measured ÷ ideal (≤ ~1) says how much of what the
shapes allow the engine delivered.
"""

from __future__ import annotations

from dataclasses import dataclass

from mptool.shapes import Dims, total_params

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of the dtypes the engines serve in."""


def layer_matmul_params(d: Dims) -> int:
    """Matmul weights of one decoder layer: q, k, v, o projections and gate, up, down."""
    h, hd = d.hidden_size, d.head_dim
    attention = h * d.num_heads * hd + 2 * h * d.num_kv_heads * hd + d.num_heads * hd * h
    return attention + 3 * h * d.intermediate_size


def lm_head_params(d: Dims) -> int:
    """Weights of the LM head (``vocab x hidden``), tied or not."""
    return d.vocab_size * d.hidden_size


def attention_flops(d: Dims, prompt_len: int) -> int:
    """Score (``QK^T``) and value (``AV``) FLOPs of a causal prompt of ``prompt_len`` tokens.

    Query ``i`` (0-based) meets ``i + 1`` keys in every head: ``2 x head_dim`` FLOPs per score and
    as many per value, summed over the prompt: ``2 x heads x head_dim x P (P + 1)`` per layer.
    """
    return d.num_layers * 2 * d.num_heads * d.head_dim * prompt_len * (prompt_len + 1)


def prefill_flops(d: Dims, prompt_len: int) -> int:
    """FLOPs to read one prompt and produce the logits of its first new token."""
    matmul = prompt_len * 2 * d.num_layers * layer_matmul_params(d)
    return matmul + attention_flops(d, prompt_len) + 2 * lm_head_params(d)


def prefill_flops_per_token(d: Dims, prompt_len: int) -> float:
    """:func:`prefill_flops` divided by the prompt length."""
    return prefill_flops(d, prompt_len) / prompt_len


def kv_bytes_per_token(d: Dims, dtype_bytes: int) -> int:
    """KV-cache bytes one token of one sequence occupies (keys and values, all layers)."""
    return d.num_layers * 2 * d.num_kv_heads * d.head_dim * dtype_bytes


def weight_bytes_read(d: Dims, dtype_bytes: int) -> int:
    """Bytes of weights one decode step reads, independent of the batch.

    Every parameter once, except an untied input embedding table, of which a step reads only the
    rows it looks up (counted per sequence in :func:`decode_bytes_per_step`).
    """
    params = total_params(d)
    if not d.tied:
        params -= d.vocab_size * d.hidden_size
    return params * dtype_bytes


def decode_context(prompt_len: int, new_tokens: int) -> float:
    """Mean context length of the decode steps of one request.

    The first new token comes from prefill; decode step ``j = 1 .. N-1`` attends over
    ``P + j`` positions, whose mean is ``P + N / 2``.
    """
    return prompt_len + new_tokens / 2


def decode_bytes_per_step(d: Dims, batch_size: int, context: float, dtype_bytes: int) -> float:
    """Bytes one decode step of ``batch_size`` sequences at ``context`` positions reads."""
    # an untied embedding table is read one looked-up row per sequence; a tied one is read whole
    # as the LM head already (weight_bytes_read)
    per_sequence = kv_bytes_per_token(d, dtype_bytes) * context + (0 if d.tied else d.hidden_size * dtype_bytes)
    return weight_bytes_read(d, dtype_bytes) + batch_size * per_sequence


def decode_bytes_per_token(d: Dims, batch_size: int, context: float, dtype_bytes: int) -> float:
    """:func:`decode_bytes_per_step` shared by the ``batch_size`` tokens the step produces."""
    return decode_bytes_per_step(d, batch_size, context, dtype_bytes) / batch_size


@dataclass(frozen=True)
class Ideal:
    """The counts behind one sweep cell and the ideal speed-ups they give."""

    prefill_flops_per_token: tuple[float, float]
    """(dense, pruned) FLOPs per prompt token."""
    decode_bytes_per_token: tuple[float, float]
    """(dense, pruned) bytes read per output token."""

    @property
    def prefill(self) -> float:
        """Ideal time-to-first-token speed-up: dense ÷ pruned FLOPs."""
        dense, pruned = self.prefill_flops_per_token
        return dense / pruned

    @property
    def decode(self) -> float:
        """Ideal decode speed-up: dense ÷ pruned bytes per output token."""
        dense, pruned = self.decode_bytes_per_token
        return dense / pruned

    def output(self, ttft_s: float, tpot_s: float, new_tokens: int) -> float:
        """Ideal end-to-end speed-up of a dense request timed ``ttft_s`` + ``(N-1) x tpot_s``.

        Each phase shrinks by its own ideal; the request as a whole by the weighted mix.
        """
        dense = ttft_s + (new_tokens - 1) * tpot_s
        pruned = ttft_s / self.prefill + (new_tokens - 1) * tpot_s / self.decode
        return dense / pruned

    def as_dict(self) -> dict[str, dict[str, float]]:
        dense_f, pruned_f = self.prefill_flops_per_token
        dense_b, pruned_b = self.decode_bytes_per_token
        return {
            "prefill_flops_per_token": {"dense": dense_f, "pruned": pruned_f},
            "decode_bytes_per_token": {"dense": dense_b, "pruned": pruned_b},
        }


def ideal(dense: Dims, pruned: Dims, batch_size: int, prompt_len: int, new_tokens: int,
          dtype_bytes: int) -> Ideal:
    """The ideal counts of one sweep cell (``batch_size`` prompts of ``prompt_len``, ``N`` new)."""
    context = decode_context(prompt_len, new_tokens)
    return Ideal(
        prefill_flops_per_token=(prefill_flops_per_token(dense, prompt_len),
                                 prefill_flops_per_token(pruned, prompt_len)),
        decode_bytes_per_token=(decode_bytes_per_token(dense, batch_size, context, dtype_bytes),
                                decode_bytes_per_token(pruned, batch_size, context, dtype_bytes)),
    )
