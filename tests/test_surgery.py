"""Slicing equals masking, on every family and granularity; the written checkpoint reloads."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import FAMILIES, tiny_model
from mptool.hooks import apply_masks, keeps_to_masks
from mptool.shapes import Dims, Target, total_params
from mptool.surgery import LayerKeep, check_keeps, dense_keeps, materialize
from mptool.errors import MptoolError


def random_keeps(d: Dims, t: Target, seed: int = 0) -> list[LayerKeep]:
    rng = random.Random(seed)
    keeps = []
    for _ in range(d.num_layers):
        groups = sorted(rng.sample(range(d.num_kv_heads), t.kv_heads))
        heads = [sorted(rng.sample(range(d.heads_per_group), t.heads_per_group)) for _ in groups]
        ffn = sorted(rng.sample(range(d.intermediate_size), t.ffn))
        keeps.append(LayerKeep(groups, heads, ffn))
    return keeps


def granularities(d: Dims) -> dict[str, Target]:
    return {
        "kv_groups": Target(d.num_kv_heads - 1, d.heads_per_group, d.intermediate_size),
        "heads_per_group": Target(d.num_kv_heads, d.heads_per_group - 1, d.intermediate_size),
        "ffn": Target(d.num_kv_heads, d.heads_per_group, d.intermediate_size // 2),
        "all": Target(d.num_kv_heads - 1, d.heads_per_group - 1, d.intermediate_size // 2 + 3),
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gran", ["kv_groups", "heads_per_group", "ffn", "all"])
def test_masked_equals_sliced(family, gran, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    d = Dims.from_config(model.config)
    t = granularities(d)[gran]
    keeps = random_keeps(d, t)
    ids = torch.randint(3, d.vocab_size, (2, 17))

    heads, ffn = keeps_to_masks(d, keeps)
    with torch.no_grad(), apply_masks(model, heads, ffn):
        masked = model(ids).logits
    sliced = materialize(model, keeps)
    with torch.no_grad():
        direct = sliced(ids).logits
    assert rel_err(direct, masked) <= 1e-5

    # What is written is what reloads: same logits, same count, same shape everywhere.
    sliced.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        reloaded = again(ids).logits
    assert rel_err(reloaded, masked) <= 1e-5
    assert again.config.head_dim == d.head_dim
    assert again.config.num_attention_heads == t.heads
    assert again.config.num_key_value_heads == t.kv_heads
    assert again.config.intermediate_size == t.ffn
    n = sum(p.numel() for p in again.parameters())
    assert n == total_params(d, t)
    assert n < sum(p.numel() for p in model.parameters())


def test_llama_with_non_dividing_heads_is_written_as_mistral(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")  # hidden 128, 8 heads in 4 groups
    d = Dims.from_config(model.config)
    t = Target(3, 2, d.intermediate_size)  # 6 heads: 128 % 6 != 0
    keeps = random_keeps(d, t, seed=3)
    heads, ffn = keeps_to_masks(d, keeps)
    ids = torch.randint(3, d.vocab_size, (1, 11))
    with torch.no_grad(), apply_masks(model, heads, ffn):
        masked = model(ids).logits
    materialize(model, keeps).save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(again).__name__ == "MistralForCausalLM"
    assert again.config.sliding_window is None
    with torch.no_grad():
        assert rel_err(again(ids).logits, masked) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_surgery_is_idempotent(family):
    model = tiny_model(family)
    d = Dims.from_config(model.config)
    t = granularities(d)["all"]
    once = materialize(model, random_keeps(d, t))
    twice = materialize(once, dense_keeps(Dims.from_config(once.config)))
    a, b = once.state_dict(), twice.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert once.config.to_dict() == twice.config.to_dict()


def test_non_uniform_keeps_are_refused():
    model = tiny_model("llama")
    d = Dims.from_config(model.config)
    keeps = dense_keeps(d)
    keeps[1].ffn = keeps[1].ffn[:-1]
    with pytest.raises(MptoolError, match="not uniform"):
        check_keeps(d, keeps)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_consuming_the_dense_model_gives_the_same_model_without_a_second_copy(family, tied):
    """materialize(consume=True), what a sharded MaskPrune run ends with on rank 0: the same
    weights, buffers and logits as the copying path, the dense model's sliced weights emptied
    as they are cut (so the host never holds both), its other tensors moved, not copied."""
    model = tiny_model(family, tie_word_embeddings=tied)
    d = Dims.from_config(model.config)
    keeps = random_keeps(d, granularities(d)["all"], seed=3)
    copied = materialize(model, keeps)
    ids = torch.randint(0, d.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    embed = model.get_input_embeddings().weight
    consumed = materialize(model, keeps, consume=True)
    a, b = copied.state_dict(), consumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(copied.named_buffers(), consumed.named_buffers()))
    assert type(consumed) is type(copied) and consumed.config.to_dict() == copied.config.to_dict()
    with torch.no_grad():
        assert torch.equal(copied(ids).logits, consumed(ids).logits)
    # the dense model's projections are emptied; the embedding moved as it is (no copy)
    sliced = [p for n, p in model.named_parameters() if n.endswith(("q_proj.weight", "down_proj.weight"))]
    assert sliced and all(p.numel() == 0 for p in sliced)
    assert consumed.get_input_embeddings().weight.data_ptr() == embed.data_ptr()
    assert (consumed.get_output_embeddings().weight is consumed.get_input_embeddings().weight) == tied
