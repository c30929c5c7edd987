"""The saliency benchmark: its gate gradient is the true derivative, and its table is complete.

The benchmark's finding (the first-order mask gradient ranks FFN channels worse than wanda-sp at
the CPU budget) rests on ``ffn_gate_gradients`` being the derivative MaskPrune's mask step follows:
checked here against central finite differences, and against the property that KD has no
gradient at the teacher (so at the dense point KD + 0.5 LM gives half the LM gradient).
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tokenizer, tiny_model


def _lm_loss_at(model, x, z):
    import torch.nn.functional as F

    from mptool.hooks import apply_masks

    n_heads = model.config.num_attention_heads
    with apply_masks(model, lambda i: torch.ones(n_heads), lambda i: z[i]), torch.no_grad():
        logits = model(x).logits
        return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()))


def test_gate_gradient_matches_finite_differences():
    from mptool.benchmarks.saliency import ffn_gate_gradients

    model = tiny_model("llama").double()
    torch.manual_seed(1)
    x = torch.randint(3, 320, (2, 24))
    L, I = model.config.num_hidden_layers, model.config.intermediate_size
    point = (torch.rand(L, I) > 0.5).double()
    g = ffn_gate_gradients(model, x, point, per=2, kd=False, bf16=False)
    assert g.shape == (1, L, I)
    # RMSNorm computes in float32 even in a float64 model, so the loss carries ~1e-9 of noise:
    # a central difference with a wide eps (truncation error ~eps^2, tiny for a gate) is accurate
    eps = 3e-2
    for layer, unit in [(0, 3), (1, 100), (1, 7)]:
        e = torch.zeros(L, I, dtype=torch.float64)
        e[layer, unit] = eps
        fd = (_lm_loss_at(model, x, point + e) - _lm_loss_at(model, x, point - e)) / (2 * eps)
        assert float(g[0, layer, unit]) == pytest.approx(fd, rel=2e-3, abs=1e-7)


def test_kd_has_no_gradient_at_the_teacher():
    from mptool.benchmarks.saliency import ffn_gate_gradients, snr

    model = tiny_model("llama")
    torch.manual_seed(2)
    x = torch.randint(3, 320, (4, 16))
    ones = torch.ones(model.config.num_hidden_layers, model.config.intermediate_size)
    both = ffn_gate_gradients(model, x, ones, per=1, kd=True, lm_weight=0.5, bf16=False)
    lm = ffn_gate_gradients(model, x, ones, per=1, kd=False, bf16=False)
    assert both.shape == lm.shape == (4, *ones.shape)
    torch.testing.assert_close(both, 0.5 * lm, rtol=1e-4, atol=1e-7)
    # the t statistic: |mean| / standard error, one per unit
    t = snr(lm)
    assert t.shape == ones.shape
    torch.testing.assert_close(t[0, 0], lm[:, 0, 0].mean().abs() / (lm[:, 0, 0].std() / 2), rtol=1e-4, atol=0)


def test_table_on_a_tiny_model(tmp_path):
    from transformers import AutoTokenizer

    from mptool.benchmarks import saliency

    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok")).save_pretrained(model_dir)
    out = tmp_path / "s.json"
    result = saliency.main(["--model", str(model_dir), "--kv-heads", "2", "--heads-per-group", "2",
                            "--ffn", "128", "--recover", "--tokens", "128", "--seq-len", "32",
                            "--batch-size", "2", "--calib-tokens", "128", "--eval-tokens", "192",
                            "--out", str(out)])
    assert json.loads(out.read_text()) == result
    rows = {r["selection"]: r for r in result["rows"]}
    assert set(saliency.RECOVER) < set(rows)
    assert {"first-order", "first-order (1 batch)", "fisher @ dense", "fisher @ wanda-sp"} < set(rows)
    assert rows["wanda-sp"]["ffn_changed_vs_wanda_sp"] == 0
    for name, r in rows.items():
        assert r["ppl"] > 1 and 0 <= r["ffn_changed_vs_wanda_sp"] <= 1
        assert ("ppl_after_recovery" in r) == (name in saliency.RECOVER)
    assert result["target"]["ffn"] == 128 and result["gradient_snr"]["sequences"] == 4
    assert result["recovery_tokens"] == 128
    # the order of the calibration blocks is recorded, and the command states it
    assert result["protocol"]["data_order"] == "shuffled" and result["command"].endswith("--data-order shuffled")
