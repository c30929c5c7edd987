"""Least-squares compensation of pruned units (mptool.compensate) and MaskPrune running with it."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny_model
from mptool.baselines import calibrate, score, select
from mptool.compensate import DAMP, compensate, delta, kept_columns
from mptool.config import CompressConfig
from mptool.maskprune import MaskPrune, kd_loss
from mptool.shapes import Dims, Target
from mptool.surgery import materialize
from test_maskprune import blocks, cfg, finish_against_masked


def grams_of(model, data):
    o, d = calibrate(model, data, gram=True)
    return [s.gram for s in o], [s.gram for s in d]


def test_delta_is_exact_when_the_dropped_inputs_are_combinations_of_the_kept():
    g = torch.Generator().manual_seed(0)
    xk = torch.randn(500, 6, dtype=torch.float64, generator=g)
    mix = torch.randn(6, 4, dtype=torch.float64, generator=g)
    x = torch.cat([xk, xk @ mix], 1)[:, torch.tensor([0, 6, 1, 2, 7, 3, 8, 4, 9, 5])]  # dropped interleaved
    kept = torch.tensor([0, 2, 3, 5, 7, 9])
    w = torch.randn(3, 10, dtype=torch.float64, generator=g)
    dw = delta(w, x.T @ x, kept, damp=0.0)
    assert dw.shape == (3, 6)
    assert torch.allclose(x[:, kept] @ (w[:, kept] + dw).T, x @ w.T, atol=1e-9)


def test_delta_is_the_least_squares_optimum_and_beats_the_plain_cut():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 12, dtype=torch.float64, generator=g) @ torch.randn(12, 12, dtype=torch.float64, generator=g)
    w = torch.randn(5, 12, dtype=torch.float64, generator=g)
    kept = torch.tensor([1, 4, 5, 8, 10])
    dw = delta(w, x.T @ x, kept, damp=0.0)
    best = torch.linalg.lstsq(x[:, kept], x @ w.T).solution.T  # [5, k]
    assert torch.allclose(w[:, kept] + dw, best, atol=1e-8)
    err = lambda wk: (x[:, kept] @ wk.T - x @ w.T).pow(2).sum()  # noqa: E731
    assert err(w[:, kept] + dw) < 0.9 * err(w[:, kept])
    assert delta(w, x.T @ x, torch.arange(12)) is None  # nothing dropped, nothing to add


def test_the_solve_falls_back_to_the_host_when_the_gpu_has_no_room(monkeypatch):
    """The solve runs on the training device (a GPU solves the kept block in milliseconds); when
    that device is out of memory it runs on the CPU instead and gives the CPU's answer."""
    import mptool.compensate as C

    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 10, dtype=torch.float64, generator=g)
    kept = torch.tensor([0, 2, 3, 7, 9])
    tried = []

    def no_room(real):
        """``real`` on the CPU; on any other device out of memory."""
        def on(*args):
            tried.append(args[-1].type)
            if args[-1].type != "cpu":
                raise torch.OutOfMemoryError("no room")
            return real(*args)
        return on

    monkeypatch.setattr(C, "_regression", no_room(C._regression))
    use, dropped, coef = C.regression(x.T @ x, kept, 10, device=torch.device("cuda", 0))
    assert tried == ["cuda", "cpu"] and coef.device.type == "cpu"
    want = C.regression(x.T @ x, kept, 10)
    assert torch.equal(coef, want[2]) and torch.equal(dropped, torch.tensor([1, 4, 5, 6, 8]))
    # and so does applying the coefficients to the weight
    monkeypatch.setattr(C, "_apply", no_room(C._apply))
    w = torch.randn(4, 10, dtype=torch.float64, generator=g)
    dw = C.apply_regression(w, kept, use, dropped, coef, device=torch.device("cuda", 0))
    assert tried[3:] == ["cuda", "cpu"] and torch.equal(dw, delta(w, x.T @ x, kept))


@pytest.mark.parametrize("family", FAMILIES)
def test_compensation_changes_only_kept_columns_and_lowers_the_layer_error(family):
    model = tiny_model(family)
    d = Dims.from_config(model.config)
    data = blocks(d.vocab_size, 8, 32)
    o_st, d_st = calibrate(model, data, gram=True)
    keeps = select(score(model, "flap", o_st, d_st), Target(d.num_kv_heads, d.heads_per_group, d.intermediate_size // 2))
    comp = tiny_model(family)
    compensate(comp, keeps, [s.gram for s in o_st], [s.gram for s in d_st])
    down = lambda m: m.model.layers[0].mlp.down_proj.weight  # noqa: E731
    cols = kept_columns(d, keeps[0])[1]
    dropped = torch.ones(d.intermediate_size, dtype=torch.bool)
    dropped[cols] = False
    assert torch.equal(down(comp)[:, dropped], down(model)[:, dropped])
    assert not torch.allclose(down(comp)[:, cols], down(model)[:, cols])
    # every head kept: o_proj has nothing to absorb
    assert torch.equal(comp.model.layers[0].self_attn.o_proj.weight, model.model.layers[0].self_attn.o_proj.weight)
    # layer 0's FFN sees the same input in all three models: the error of its output on the
    # calibration text is what least squares minimised, so it must drop
    xs = []
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(data)
    h.remove()
    x = torch.cat(xs)
    full = x @ down(model).T
    plain = x[:, cols] @ down(model)[:, cols].T
    fixed = x[:, cols] @ down(comp)[:, cols].T
    assert (fixed - full).pow(2).sum() < 0.7 * (plain - full).pow(2).sum()
    # and the sliced compensated model keeps exactly those columns
    sliced = materialize(comp, keeps)
    assert torch.equal(sliced.model.layers[0].mlp.down_proj.weight, down(comp)[:, cols])


@pytest.mark.parametrize("family", FAMILIES)
def test_maskprune_with_compensation_finishes_equal_to_the_masked_model(family):
    model = tiny_model(family)
    d = Dims.from_config(model.config)
    data = blocks(d.vocab_size)
    grams = grams_of(model, data)
    target = Target(d.num_kv_heads - 1, d.heads_per_group - 1 or 1, d.intermediate_size // 2)
    mp = MaskPrune(model, data, cfg(init="flap"), target=target, ffn_multiple=16, grams=grams)
    mp.run()
    assert any(e[2] is not None for e in mp.comp.entries.values())
    sliced, keeps, rel = finish_against_masked(mp, blocks(d.vocab_size, 2, 9))
    assert rel <= 1e-5
    assert {k.target() for k in keeps} == {target}


def _trainer(family: str, compensated: bool) -> MaskPrune:
    model = tiny_model(family, seed=2)
    d = Dims.from_config(model.config)
    data = blocks(d.vocab_size)
    return MaskPrune(model, data, cfg(init="flap"),
                     target=Target(d.num_kv_heads, d.heads_per_group, d.intermediate_size // 4),
                     ffn_multiple=16, grams=grams_of(model, data) if compensated else None)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_compensated_structure_is_closer_to_the_teacher_which_it_leaves_alone(family):
    with_c, without = _trainer(family, True), _trainer(family, False)
    assert without.grams is None
    ids = blocks(with_c.d.vocab_size, 4, 32)
    kd = {}
    for name, mp in (("with", with_c), ("without", without)):
        mp.model.eval()
        st = mp.state
        with torch.no_grad():
            mp._masks_on = False
            with mp.model.disable_adapter():
                teacher = mp.model(ids).logits
            mp._masks_on = True
            mp._effective(st.zg, st.zh, st.zf)  # the initial hard structure
            kd[name] = (teacher, float(kd_loss(mp.model(ids).logits, teacher, 1.0)))
    assert torch.equal(kd["with"][0], kd["without"][0])  # the teacher runs without compensation
    assert kd["with"][1] < 0.8 * kd["without"][1]


def test_resume_with_compensation_gives_the_same_weights(tmp_path):
    def trainer():
        model = tiny_model("mistral", seed=3)
        d = Dims.from_config(model.config)
        data = blocks(d.vocab_size)
        return MaskPrune(model, data, cfg(steps=10, checkpoint_every=4, init="flap"),
                         target=Target(1, 2, 64), ffn_multiple=32, seed=5, grams=grams_of(model, data))

    full = trainer()
    full.run()
    ckpt = tmp_path / "ckpt"
    trainer().run(checkpoint_dir=ckpt, stop_after=6)
    resumed = trainer()
    resumed.load_checkpoint(ckpt)
    resumed.run(checkpoint_dir=ckpt)
    a, b = full.finish()[0].state_dict(), resumed.finish()[0].state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_scaled_forward_with_compensation_finishes_equal_to_the_masked_model():
    model = tiny_model("qwen3")
    d = Dims.from_config(model.config)
    data = blocks(d.vocab_size)
    mp = MaskPrune(model, data, cfg(forward="scaled", init="wanda-sp"), target=Target(1, 1, 128),
                   ffn_multiple=16, grams=grams_of(model, data))
    mp.run()
    assert finish_against_masked(mp, blocks(d.vocab_size, 2, 9))[2] <= 1e-5


def test_the_default_decides_by_the_host_memory_the_gram_matrices_need():
    from mptool.compensate import fits, gram_bytes, host_gram_bytes

    assert CompressConfig().compensate is None  # auto
    d = Dims.from_config(tiny_model("llama").config)
    need = gram_bytes(d)
    assert need == d.num_layers * ((d.num_heads * d.head_dim) ** 2 + d.intermediate_size ** 2) * 8
    assert fits(d, available=2 * need) and not fits(d, available=2 * need - 1)
    assert not fits(d, processes=2, available=2 * need)
    # FSDP with the learned selection: each of 2 processes keeps its share of the 2 layers
    assert gram_bytes(d, shares=2) == need // 2 and gram_bytes(d, shares=3) == need // 2
    assert fits(d, processes=2, available=2 * need, shares=2)
    # a one-shot method under 2 processes: rank 0 holds all while it calibrates, the other its share
    assert host_gram_bytes(d, 2, shares=2, whole=1) == need + need // 2
    assert fits(d, processes=2, available=3 * need, shares=2, whole=1)
    assert not fits(d, processes=2, available=3 * need - 1, shares=2, whole=1)


def test_frozen_kept_columns_keep_their_weights_and_the_rest_is_least_squares():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 8, dtype=torch.float64, generator=g) @ torch.randn(8, 8, dtype=torch.float64, generator=g)
    w = torch.randn(4, 8, dtype=torch.float64, generator=g)
    kept = torch.tensor([0, 2, 3, 6])
    frozen = torch.zeros(8, dtype=torch.bool)
    frozen[3] = True
    dw = delta(w, x.T @ x, kept, damp=0.0, frozen=frozen)
    assert torch.equal(dw[:, 2], torch.zeros(4, dtype=torch.float64))  # column 3 is the third kept one
    regs = torch.tensor([0, 2, 6])
    drop = torch.tensor([1, 4, 5, 7])
    best = torch.linalg.lstsq(x[:, regs], x[:, drop] @ w[:, drop].T).solution.T
    assert torch.allclose(dw[:, [0, 1, 3]], best, atol=1e-8)


def test_maskprune_leaves_the_protected_channels_out_of_the_regression():
    """Protected (massive-activation) channels keep their weights under compensation: their delta
    column is 0, and the finished model still equals the masked one."""
    model = tiny_model("llama")
    d = Dims.from_config(model.config)
    data = blocks(d.vocab_size)
    protected = torch.zeros(d.num_layers, d.intermediate_size, dtype=torch.bool)
    protected[:, 3] = True
    mp = MaskPrune(model, data, cfg(init="flap"), target=Target(d.num_kv_heads, d.heads_per_group, 64),
                   ffn_multiple=16, grams=grams_of(model, data), protected=protected)
    mp.run()
    for layer in range(d.num_layers):
        _, cols, dw = mp.comp.entries[(layer, 1)]
        at = (cols == 3).nonzero().squeeze(1)
        assert len(at) == 1 and torch.equal(dw[:, at], torch.zeros_like(dw[:, at]))
        assert dw.abs().sum() > 0  # the other kept columns do absorb the dropped ones
    assert finish_against_masked(mp, blocks(d.vocab_size, 2, 9))[2] <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_in_place_sliced_and_training_compensation_agree_with_heads_dropped_and_a_protected_channel(
        family, monkeypatch):
    """The three ways compensation reaches a model — compensate() in place then sliced, compensate()
    into an already sliced copy (one-shot methods, MaskPrune's one-shot select), and the
    Compensator hooks MaskPrune trains with — give the same deltas, o_proj included (heads
    dropped), each projection with its own ridge term (compensate.DAMP), and all leave a protected
    channel's column alone."""
    import mptool.compensate as C
    from mptool.baselines import protect
    from mptool.compensate import Compensator
    from mptool.hooks import _projections

    monkeypatch.setattr(C, "DAMP", (0.3, DAMP[1]))

    model = tiny_model(family)
    d = Dims.from_config(model.config)
    data = blocks(d.vocab_size, 8, 32)
    o_st, d_st = calibrate(model, data, gram=True)
    grams = ([s.gram for s in o_st], [s.gram for s in d_st])
    protected = torch.zeros(d.num_layers, d.intermediate_size, dtype=torch.bool)
    protected[:, 3] = True
    target = Target(d.num_kv_heads - 1, d.heads_per_group - 1 or 1, d.intermediate_size // 2)
    keeps = select(protect(score(model, "flap", o_st, d_st), protected), target)
    assert all(3 in k.ffn for k in keeps)
    in_place = tiny_model(family)
    compensate(in_place, keeps, *grams, protected=protected)
    into = materialize(model, keeps)
    compensate(model, keeps, *grams, into=into, protected=protected)
    a, b = materialize(in_place, keeps).state_dict(), into.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    comp = Compensator(_projections(model), grams, d.head_dim,
                       frozen=lambda layer, j: protected[layer] if j == 1 else None)
    heads = torch.zeros(d.num_layers, d.num_heads)
    ffn = torch.zeros(d.num_layers, d.intermediate_size)
    for layer, k in enumerate(keeps):
        heads[layer, k.query_heads(d.heads_per_group)] = 1
        ffn[layer, k.ffn] = 1
    comp.set(heads, ffn)
    for layer, k in enumerate(keeps):
        for j, cols in enumerate(kept_columns(d, k)):
            dense_w, comp_w = _projections(model)[layer][j].weight, _projections(in_place)[layer][j].weight
            added = comp_w[:, cols] - dense_w[:, cols]
            _, hook_cols, dw = comp.entries[(layer, j)]
            assert torch.equal(hook_cols, cols)
            assert added.abs().sum() > 0  # heads and channels were dropped in both projections
            assert torch.allclose(dw, added, atol=1e-6)
        down_in, down_dense = _projections(in_place)[layer][1].weight, _projections(model)[layer][1].weight
        assert torch.equal(down_in[:, 3], down_dense[:, 3])
        # o_proj was solved with its own ridge term, read at the call, and it made a difference
        o_cols = kept_columns(d, k)[0]
        o_dense = _projections(model)[layer][0].weight
        want = delta(o_dense, grams[0][layer], o_cols, 0.3)
        assert torch.allclose(_projections(in_place)[layer][0].weight[:, o_cols] - o_dense[:, o_cols], want, atol=1e-6)
        assert torch.allclose(comp.entries[(layer, 0)][2], want, atol=1e-6)
        assert (want - delta(o_dense, grams[0][layer], o_cols, DAMP[1])).abs().max() > 1e-4
    comp.remove()
