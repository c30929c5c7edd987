"""Each legality rule, parameter counts, candidate listing and target snapping."""

from __future__ import annotations

import pytest

from conftest import FAMILIES, tiny_model
from mptool.errors import MptoolError
from mptool.shapes import (RULES, Dims, Target, balanced_target, candidates, check, nearest_legal,
                           prunable_params, total_params, validate_target)

# SmolLM2-135M's shape (the embedded default), without loading weights.
SMOL = Dims(model_type="llama", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
            head_dim=64, intermediate_size=1536, vocab_size=49152, tied=True, qkv_bias=False,
            o_bias=False, mlp_bias=False, qk_norm=False)


def test_smollm2_dense_count_matches_the_published_size():
    assert total_params(SMOL) == 134_515_008


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_count_equals_real_model(family):
    model = tiny_model(family)
    assert total_params(Dims.from_config(model.config)) == sum(p.numel() for p in model.parameters())


def test_every_rule_has_a_test():
    tested = {"positive", "within_dense", "gqa_integer_ratio", "ffn_multiple", "tp_heads",
              "tp_kv_heads", "tp_ffn", "vllm_cpu_head_size", "llama_bias_as_mistral"}
    assert {r.name for r in RULES} == tested


def test_positive():
    assert any(">= 1" in p for p in check(SMOL, Target(0, 3, 1536)))


def test_within_dense():
    assert any("exceeds the dense" in p for p in check(SMOL, Target(3, 4, 1536)))
    assert any("exceeds the dense" in p for p in check(SMOL, Target(3, 3, 2048)))


def test_gqa_integer_ratio_holds_by_construction():
    t = Target(2, 3, 768)
    assert t.heads % t.kv_heads == 0 and not check(SMOL, t)


def test_ffn_multiple():
    assert check(SMOL, Target(3, 3, 700)) == ["FFN 700 is not a multiple of 64"]
    assert not check(SMOL, Target(3, 3, 700), ffn_multiple=4)
    assert not check(SMOL, Target(3, 3, 1536), ffn_multiple=1000)  # the dense width is always legal


def test_tp_heads_dense_smollm2_refuses_tp2_but_6_heads_in_2_groups_accepts():
    dense = SMOL.dense_target()
    problems = check(SMOL, dense, tp=(2,))
    assert any("9 attention heads are not divisible by 2" in p for p in problems)
    assert not check(SMOL, Target(2, 3, 768), tp=(2,))


def test_tp_kv_heads():
    assert any("3 KV heads are not divisible by 2" in p for p in check(SMOL, Target(3, 2, 768), tp=(2,)))
    assert not check(SMOL, Target(1, 2, 768), tp=(2,))  # 1 KV head is replicated over 2 ranks
    assert any("not a multiple of 2 KV heads" in p
               for p in check(SMOL, Target(2, 3, 768), tp=(3,)) if "KV" in p)


def test_tp_ffn():
    assert any("FFN 1344 is not divisible by 256" in p
               for p in check(SMOL, Target(1, 1, 1344), tp=(256,)))


def test_vllm_cpu_head_size():
    tiny = Dims(**{**SMOL.__dict__, "head_dim": 16, "hidden_size": 144})
    assert any("head_dim 16" in p for p in check(tiny, tiny.dense_target(), engines=["vllm-cpu"]))
    assert not check(tiny, tiny.dense_target())  # not a pruning constraint unless vLLM-CPU is named
    assert not check(SMOL, SMOL.dense_target(), engines=["vllm-cpu"])


def test_llama_with_bias_cannot_be_written_as_mistral():
    biased = Dims(**{**SMOL.__dict__, "hidden_size": 128, "num_heads": 8, "num_kv_heads": 4,
                     "qkv_bias": True, "o_bias": True})
    assert any("attention or MLP biases" in p for p in check(biased, Target(3, 2, 768)))  # 128 % 6 != 0
    assert not check(biased, Target(2, 2, 768))  # 4 heads divide 128: stays Llama
    unbiased = Dims(**{**biased.__dict__, "qkv_bias": False, "o_bias": False})
    assert not check(unbiased, Target(3, 2, 768))  # written as Mistral
    mlp_biased = Dims(**{**unbiased.__dict__, "mlp_bias": True})  # Mistral has no MLP bias either
    assert any("MLP biases" in p for p in check(mlp_biased, Target(3, 2, 768)))
    assert not check(mlp_biased, Target(2, 2, 768))


def test_illegal_target_names_nearest_legal():
    with pytest.raises(MptoolError) as err:
        validate_target(SMOL, Target(3, 3, 700), tp=(1,))
    msg = str(err.value)
    assert "illegal target" in msg and "Nearest legal:" in msg
    assert "ffn=704" in msg  # the closest multiple of 64
    assert "\n" not in msg
    near = nearest_legal(SMOL, Target(3, 3, 700))
    assert all(not check(SMOL, t) for t in near)


@pytest.mark.parametrize("ratio", [0.2, 0.25, 0.5])
@pytest.mark.parametrize("tp", [(1,), (1, 2)])
def test_candidates_are_legal_and_within_budget(ratio, tp):
    budget = (1 - ratio) * prunable_params(SMOL, SMOL.dense_target())
    cands = candidates(SMOL, ratio, tp)
    assert cands
    for t in cands:
        assert prunable_params(SMOL, t) <= budget
        assert not check(SMOL, t, tp)
        # the widest FFN in budget for that attention shape
        wider = Target(t.kv_heads, t.heads_per_group, t.ffn + 64)
        assert t.ffn == SMOL.intermediate_size or prunable_params(SMOL, wider) > budget or check(SMOL, wider, tp)


def test_balanced_target_splits_the_budget_evenly():
    t = balanced_target(SMOL, 0.5)
    assert prunable_params(SMOL, t) <= 0.5 * prunable_params(SMOL, SMOL.dense_target())
    assert prunable_params(SMOL, t) >= 0.45 * prunable_params(SMOL, SMOL.dense_target())


def test_ratio_outside_unit_interval():
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(MptoolError, match=r"outside \(0, 1\)"):
            candidates(SMOL, bad)
