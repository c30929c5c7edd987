"""MaskPrune on tiny models: uniform result, finish == masked model, learned targets, resume."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, plant_massive_channel, tiny_model
from mptool.maskprune import MaskPrune, MaskPruneConfig
from mptool.shapes import Dims, Target, check, prunable_params, total_params


def blocks(vocab: int, n: int = 8, seq: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab, (n, seq), generator=g)


def finish_against_masked(mp, ids):
    """Logits of the masked model at the trained masks, then finish(): (sliced, keeps, rel. error)."""
    st = mp.state
    mp.model.eval()
    with torch.no_grad():
        mp._effective(st.zg, st.zh, st.zf)
        masked = mp.model(ids).logits
    sliced, keeps = mp.finish()
    with torch.no_grad():
        out = sliced(ids).logits
    return sliced, keeps, ((out - masked).norm() / masked.norm()).item()


def cfg(**kw) -> MaskPruneConfig:
    base = dict(steps=8, batch_size=2, lr_mask=0.1, checkpoint_every=0, init="ones", bf16=False)
    base.update(kw)
    return MaskPruneConfig(**base)


@pytest.mark.parametrize("family", FAMILIES)
def test_finish_equals_the_masked_model_and_is_uniform(family):
    model = tiny_model(family)
    d = Dims.from_config(model.config)
    target = Target(d.num_kv_heads - 1, d.heads_per_group - 1 or 1, d.intermediate_size // 2)
    mp = MaskPrune(model, blocks(d.vocab_size), cfg(), target=target, ffn_multiple=16)
    history = mp.run()
    assert len(history) == 8 and history[-1]["hard"]
    sliced, keeps, rel = finish_against_masked(mp, blocks(d.vocab_size, 2, 9))
    assert rel <= 1e-5
    assert {k.target() for k in keeps} == {target}
    assert history[-1]["hard_violation"] == 0.0
    assert sum(p.numel() for p in sliced.parameters()) == total_params(d, target)
    assert sliced.config.intermediate_size == target.ffn


def test_learned_targets_meet_the_budget_and_are_legal():
    model = tiny_model("llama")
    d = Dims.from_config(model.config)
    budget = 0.5 * prunable_params(d, d.dense_target())
    mp = MaskPrune(model, blocks(d.vocab_size), cfg(steps=10), budget=budget, ffn_multiple=32, tp=(1, 2))
    history = mp.run()
    kv, hpg, ffn = mp.state.snapped
    t = Target(kv, hpg, ffn)
    assert prunable_params(d, t) <= budget and not check(d, t, (1, 2), 32)
    # the continuous targets followed the annealed budget down to the final one
    s = history[4]["s_kv"], history[4]["s_heads"], history[4]["s_ffn"]
    assert all(v > 0 for v in s)
    sliced, keeps = mp.finish()
    assert {k.target() for k in keeps} == {t}


def test_snap_frac_zero_fixes_the_shape_before_the_first_step():
    """snap_frac 0 (default): the legal shape is chosen before step 1 and every step anneals toward
    it (the learned targets never move); None fixes it at the end of the warm-up."""
    model = tiny_model("llama")
    d = Dims.from_config(model.config)
    budget = 0.5 * prunable_params(d, d.dense_target())
    mp = MaskPrune(model, blocks(d.vocab_size), cfg(steps=6, snap_frac=0.0), budget=budget, ffn_multiple=32)
    assert mp.state.snapped is None
    mp.step()
    snapped = list(mp.state.snapped)
    assert prunable_params(d, Target(*snapped)) <= budget
    history = [mp.step() for _ in range(5)]
    assert list(mp.state.snapped) == snapped
    assert [history[-1][k] for k in ("s_kv", "s_heads", "s_ffn")] == [float(v) for v in snapped]
    late = MaskPrune(tiny_model("llama"), blocks(d.vocab_size), cfg(steps=6, snap_frac=None, warmup_frac=0.5),
                     budget=budget, ffn_multiple=32)
    late.step()
    assert late.state.snapped is None  # warm-up 0.5 x 6 steps: fixed after step 3
    late.step(), late.step()
    assert late.state.snapped is not None


def test_multipliers_grow_while_the_constraint_is_violated():
    model = tiny_model("qwen2")
    d = Dims.from_config(model.config)
    mp = MaskPrune(model, blocks(d.vocab_size), cfg(steps=6, warmup_frac=0.01), ffn_multiple=16,
                   target=Target(1, 1, 32))
    rows = mp.run()
    assert rows[1]["viol_ffn"] > 0 and rows[-1]["y_ffn"] > rows[1]["y_ffn"] > 0


def test_fixed_multipliers_ablation_keeps_them_fixed():
    model = tiny_model("llama")
    d = Dims.from_config(model.config)
    mp = MaskPrune(model, blocks(d.vocab_size), cfg(steps=4, fixed_multiplier=0.3),
                   target=Target(2, 1, 128))
    mp.run()
    assert float(mp.state.yf.abs().max()) == 0.0  # dual ascent never ran


@pytest.mark.parametrize("norm", ["shared", "per_type"])
def test_mask_step_is_normalised_by_one_rms_or_one_per_unit_type(norm):
    """One step from masks at 0.5, no momentum and no penalty shift: each type moves by
    lr * its gradient / the RMS it is divided by, so the step's RMS is lr per type ("per_type") or
    lr over all masks together, each type in proportion to its own gradient ("shared")."""
    model = tiny_model("llama")
    d = Dims.from_config(model.config)
    lr = 0.01
    mp = MaskPrune(model, blocks(d.vocab_size), cfg(steps=1, lr_mask=lr, mask_beta=0.0, fixed_multiplier=0.0,
                                                    mask_norm=norm), target=Target(1, 1, 64), ffn_multiple=16)
    st = mp.state
    st.zg, st.zh, st.zf = (torch.full_like(z, 0.5) for z in (st.zg, st.zh, st.zf))
    before = [z.clone() for z in (st.zg, st.zh, st.zf)]
    row = mp.run()[0]
    moved = [(z - b) for z, b in zip((st.zg, st.zh, st.zf), before)]
    rms = [float(m.pow(2).mean().sqrt()) for m in moved]
    assert all(r > 0 for r in rms), rms
    assert float(max(m.abs().max() for m in moved)) < 0.5  # nothing reached a clamp
    ratios = [row[f"grad_rms_{k}"] for k in ("kv", "heads", "ffn")]
    if norm == "per_type":
        assert rms == pytest.approx([lr] * 3, rel=1e-4)
    else:
        assert rms == pytest.approx([lr * r for r in ratios], rel=1e-4)
        n = [m.numel() for m in moved]
        assert sum(k * r * r for k, r in zip(n, rms)) / sum(n) == pytest.approx(lr * lr, rel=1e-4)
    assert ratios[0] != pytest.approx(1.0, rel=1e-3)  # the types' gradients differ in scale


def test_a_decaying_mask_step_moves_the_masks_by_its_fraction_of_the_constant_step():
    """Same seed, data and masks: the first step is the constant one; at the second of two,
    "linear" is at half the rate, "cosine" at cos^2(pi/4) = half too, and the masks move half as far."""
    from mptool.maskprune import schedule_factor

    assert [schedule_factor("linear", i, 4) for i in range(4)] == pytest.approx([1, 0.75, 0.5, 0.25])
    assert [schedule_factor("cosine", i, 2) for i in range(2)] == pytest.approx([1, 0.5])
    moves = {}
    for schedule in ("constant", "linear", "cosine"):
        torch.manual_seed(0)
        model = tiny_model("llama")
        d = Dims.from_config(model.config)
        mp = MaskPrune(model, blocks(d.vocab_size), cfg(steps=2, lr_mask=0.01, mask_beta=0.0, fixed_multiplier=0.0,
                                                        lr_mask_schedule=schedule), target=Target(1, 1, 64),
                       ffn_multiple=16)
        st = mp.state
        st.zg, st.zh, st.zf = (torch.full_like(z, 0.5) for z in (st.zg, st.zh, st.zf))
        mp.step()
        first = torch.cat([z.flatten().clone() for z in (st.zg, st.zh, st.zf)])
        mp.step()
        moves[schedule] = (first, torch.cat([z.flatten() for z in (st.zg, st.zh, st.zf)]) - first)
    assert float(moves["constant"][1].abs().max()) > 1e-3
    for schedule in ("linear", "cosine"):
        assert torch.allclose(moves[schedule][0], moves["constant"][0])
        assert torch.allclose(moves[schedule][1], 0.5 * moves["constant"][1], atol=1e-7)
    with pytest.raises(ValueError, match="one of constant, linear, cosine"):
        MaskPrune(tiny_model("llama"), blocks(d.vocab_size), cfg(lr_mask_schedule="step"), target=Target(1, 1, 64),
                  ffn_multiple=16)


def test_an_unknown_mask_norm_is_refused():
    model = tiny_model("llama")
    d = Dims.from_config(model.config)
    with pytest.raises(ValueError, match="shared or per_type"):
        MaskPrune(model, blocks(d.vocab_size), cfg(mask_norm="typewise"), target=Target(1, 1, 64), ffn_multiple=16)


def test_resume_gives_the_same_masks_and_weights(tmp_path):
    def trainer():
        model = tiny_model("mistral", seed=3)
        d = Dims.from_config(model.config)
        return MaskPrune(model, blocks(d.vocab_size), cfg(steps=10, checkpoint_every=4, init="ones"),
                         target=Target(1, 2, 64), ffn_multiple=32, seed=5)

    full = trainer()
    full.run()
    ckpt = tmp_path / "ckpt"
    first = trainer()
    first.run(checkpoint_dir=ckpt, stop_after=6)  # "killed" after step 6; last checkpoint at 4
    resumed = trainer()
    resumed.load_checkpoint(ckpt)
    assert resumed.state.step == 4
    resumed.run(checkpoint_dir=ckpt)
    for key, val in full.state.tensors().items():
        assert torch.allclose(val, getattr(resumed.state, key), atol=1e-6), key
    a, b = full.finish()[0].state_dict(), resumed.finish()[0].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.parametrize("forward", ["binary", "scaled"])
def test_both_forwards_finish_equal_to_the_masked_model(forward):
    model = tiny_model("qwen3")
    d = Dims.from_config(model.config)
    mp = MaskPrune(model, blocks(d.vocab_size), cfg(forward=forward, init="wanda-sp"),
                   target=Target(1, 1, 128), ffn_multiple=16)
    mp.run()
    assert finish_against_masked(mp, blocks(d.vocab_size, 2, 9))[2] <= 1e-5


@pytest.mark.parametrize("forward", ["binary", "scaled"])
def test_a_dropped_kv_group_gets_the_gradient_of_adding_it_back(forward):
    """A KV group outside the top-k runs as 0, yet its gate gets the gradient of running it again
    with its best heads (binary forward: exactly d loss / d s of those heads at scale s = 0), so
    it can win its place back; built on the zeroed head mask it got exactly 0."""
    from mptool import masks as M

    model = tiny_model("llama")  # 4 KV groups of 2 heads
    d = Dims.from_config(model.config)
    mp = MaskPrune(model, blocks(d.vocab_size), cfg(forward=forward), target=Target(2, 1, 128), ffn_multiple=16)
    st = mp.state
    torch.manual_seed(0)
    st.zg, st.zh = torch.rand_like(st.zg) * 0.5 + 0.5, torch.rand_like(st.zh) * 0.5 + 0.5
    ids = blocks(d.vocab_size, 2, 16)

    def loss() -> torch.Tensor:
        return mp.model(ids).logits.float().log_softmax(-1)[..., :50].mean()

    zg, zh, zf = (t.clone().requires_grad_(True) for t in (st.zg, st.zh, st.zf))
    mp._effective(zg, zh, zf)
    gmask, hmask = M.group_topk(st.zg, st.zh, 2, 1)
    dropped = gmask == 0
    assert int(dropped.sum()) == 2 * d.num_layers
    heads = torch.stack(mp._heads).reshape(d.num_layers, d.num_kv_heads, -1)
    assert torch.equal(heads[dropped], torch.zeros_like(heads[dropped]))  # the forward runs without them
    loss().backward()
    assert zg.grad[dropped].abs().min() > 0 and zh.grad[dropped].abs().max() == 0
    if forward == "binary":
        within = M.group_topk(st.zg, st.zh, d.num_kv_heads, 1)[1]
        s = torch.zeros_like(st.zg, requires_grad=True)
        mp._set_masks(gmask + s, within, mp._ffn_topk(st.zf, 128))
        loss().backward()
        assert torch.allclose(zg.grad[dropped], s.grad[dropped], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("hard_frac, scaled", [(0.5, False), (1.0, True)])
def test_a_run_that_never_went_hard_keeps_its_learned_scales(hard_frac, scaled):
    """hard_frac 0.5: the last half ran the binary top-k, finish keeps units at scale 1; hard_frac
    1: every step ran soft, so finish folds the learned scales (it dropped them at this boundary)
    and equals the masked model with the kept units at their mask values."""
    model = tiny_model("llama")
    d = Dims.from_config(model.config)
    mp = MaskPrune(model, blocks(d.vocab_size), cfg(hard_frac=hard_frac, init="wanda-sp"),
                   target=Target(2, 1, 128), ffn_multiple=16)
    mp.run()
    assert mp._scaled() is scaled
    ids = blocks(d.vocab_size, 2, 9)
    mp.model.eval()
    with torch.no_grad():
        mp._set_final_masks()
        masked = mp.model(ids).logits
    sliced, _ = mp.finish()
    with torch.no_grad():
        out = sliced(ids).logits
    assert ((out - masked).norm() / masked.norm()).item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_grad_checkpointing_gives_the_same_training(family):
    """Recomputing layer activations in backward (masks applied by hooks inside the recomputed
    layers) changes memory, not the result: same masks, same weights after finish()."""
    def trainer(gc: bool):
        model = tiny_model(family, seed=2)
        d = Dims.from_config(model.config)
        return MaskPrune(model, blocks(d.vocab_size), cfg(steps=6, grad_checkpointing=gc, lr_lora=1e-2),
                         target=Target(1, 2, 64), ffn_multiple=32, seed=1)

    plain, ckpt = trainer(False), trainer(True)
    assert ckpt.model.base_model.model.is_gradient_checkpointing
    h1, h2 = plain.run(), ckpt.run()
    assert [round(r["loss"], 5) for r in h1] == [round(r["loss"], 5) for r in h2]
    for key, val in plain.state.tensors().items():
        assert torch.allclose(val, getattr(ckpt.state, key), atol=1e-6), key
    lora_b = [p for n, p in ckpt.model.named_parameters() if "lora_B" in n]
    assert max(float(p.detach().abs().max()) for p in lora_b) > 1e-4  # gradients reached LoRA through the recompute
    a, b = plain.finish()[0].state_dict(), ckpt.finish()[0].state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_churn_is_zero_with_frozen_masks_and_reported_with_moving_ones():
    """Frozen masks over an annealed target only shed units (churn 0 every step); a large mask
    step on a random model moves units across the top-k boundary, and the metric shows it."""
    d = Dims.from_config(tiny_model("llama").config)
    rows = {}
    for lr in (0.0, 0.5):
        torch.manual_seed(0)
        scores = torch.rand(d.num_layers, d.intermediate_size)
        mp = MaskPrune(tiny_model("llama"), blocks(d.vocab_size), cfg(steps=8, lr_mask=lr, warmup_frac=0.5),
                       target=Target(2, 1, 64))
        mp.state.zf = scores.clone()  # distinct values: a well-defined top-k
        rows[lr] = mp.run()
    assert all(r["churn_ffn"] == 0.0 and r["churn_heads"] == 0.0 for r in rows[0.0])
    assert max(r["churn_ffn"] for r in rows[0.5]) > 0
    assert all(0.0 <= r["churn_ffn"] <= 1.0 for r in rows[0.5])


def _continued(data: torch.Tensor, rec_steps: int = 2, schedule: str = "constant", **kw):
    """A trainer with 4 mask steps (batch 2) planned to continue with ``rec_steps`` of recovery."""
    from mptool.recover import RecoveryConfig

    model = tiny_model("llama", seed=2)
    mp = MaskPrune(model, data, cfg(steps=4, init="wanda-sp", **kw), target=Target(1, 1, 64), ffn_multiple=32, seed=3)
    mp.continue_with(RecoveryConfig(steps=rec_steps, batch_size=2, lr=5e-3, lr_schedule=schedule, bf16=False,
                                    kd_chunk=None))
    return mp


def _lora(mp) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in mp.model.named_parameters() if p.requires_grad}


def test_continued_recovery_trains_lora_on_the_frozen_structure():
    """Recovery on mask learning's adapter: masks, multipliers and targets stay as mask learning
    left them, LoRA moves at recovery's lr, and the result is still exactly the masked model."""
    d = Dims.from_config(tiny_model("llama").config)
    mp = _continued(blocks(d.vocab_size, n=16))
    mp.run()
    masks, lora, keeps = {k: v.clone() for k, v in mp.state.tensors().items()}, _lora(mp), mp.keeps()
    history = mp.run_recovery()
    assert [(r["phase"], r["step"], r["tokens"]) for r in history] == [("recovery", 1, 64), ("recovery", 2, 128)]
    assert mp.state.frozen_at == 4 and mp.state.step == 6
    assert all(torch.equal(v, getattr(mp.state, k)) for k, v in masks.items())
    assert mp.keeps() == keeps
    after = _lora(mp)
    assert all(after[n].shape == v.shape for n, v in lora.items())
    assert sum(not torch.equal(after[n], v) for n, v in lora.items()) >= len(lora) // 2
    assert {g["lr"] for g in mp.opt.param_groups} == {5e-3}
    sliced, got, rel = finish_against_masked(mp, blocks(d.vocab_size, 2, 9))
    assert rel <= 1e-5 and got == keeps and {k.target() for k in got} == {Target(1, 1, 64)}


def test_continued_recovery_trains_on_the_blocks_after_mask_learning():
    """4 mask steps of 2 blocks, then 2 recovery steps of 2: blocks 8-11 matter, 12-15 do not."""
    d = Dims.from_config(tiny_model("llama").config)
    base = blocks(d.vocab_size, n=16)

    def weights(data: torch.Tensor) -> dict[str, torch.Tensor]:
        mp = _continued(data)
        mp.run()
        mp.run_recovery()
        return mp.finish()[0].state_dict()

    other = torch.randint(3, d.vocab_size, (4, base.shape[1]), generator=torch.Generator().manual_seed(9))
    late, seen = base.clone(), base.clone()
    late[12:], seen[8:12] = other, other
    ref = weights(base)
    assert all(torch.equal(v, w) for v, w in zip(ref.values(), weights(late).values()))
    assert any(not torch.equal(v, w) for v, w in zip(ref.values(), weights(seen).values()))


def test_killed_recovery_resumes_to_the_same_weights(tmp_path):
    """Killed in recovery with a decaying learning rate: the resumed run ends where the full one does."""
    d = Dims.from_config(tiny_model("llama").config)
    data = blocks(d.vocab_size, n=16)
    full = _continued(data, rec_steps=4, schedule="cosine", checkpoint_every=2)
    full.run()
    full.run_recovery()
    ckpt = tmp_path / "ckpt"
    first = _continued(data, rec_steps=4, schedule="cosine", checkpoint_every=2)
    first.run(checkpoint_dir=ckpt)
    first.run_recovery(checkpoint_dir=ckpt, stop_after=7)  # killed after step 7; last checkpoint at 6
    resumed = _continued(data, rec_steps=4, schedule="cosine", checkpoint_every=2)
    resumed.load_checkpoint(ckpt)
    assert (resumed.state.step, resumed.state.frozen_at) == (6, 4)
    assert resumed.run() == []  # mask learning is over
    assert len(resumed.run_recovery(checkpoint_dir=ckpt)) == 2
    a, b = full.finish()[0].state_dict(), resumed.finish()[0].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_continued_recovery_follows_the_lr_schedule(monkeypatch):
    """Each recovery step's AdamW step runs at the scheduled rate: linear over 4 steps from 5e-3."""
    d = Dims.from_config(tiny_model("llama").config)
    mp = _continued(blocks(d.vocab_size, n=16), rec_steps=4, schedule="linear")
    mp.run()
    seen, step = [], mp.opt.step

    def recording_step(*a, **kw):
        seen.append(mp.opt.param_groups[0]["lr"])
        return step(*a, **kw)

    monkeypatch.setattr(mp.opt, "step", recording_step)
    mp.run_recovery()
    assert seen == pytest.approx([5e-3, 3.75e-3, 2.5e-3, 1.25e-3])


def test_a_token_budget_shortens_the_warm_up_with_the_run():
    """max_tokens ends mask learning after 4 of 8 steps: the warm-up (half the steps) is half of
    those 4, so the last steps train at the final target, as an 8-step run's last steps do."""
    d = Dims.from_config(tiny_model("llama").config)
    data = blocks(d.vocab_size, n=16)
    mp = MaskPrune(tiny_model("llama"), data, cfg(steps=8, max_tokens=4 * 2 * data.shape[1], warmup_frac=0.5),
                   target=Target(1, 1, 64), ffn_multiple=32)
    assert mp.planned_steps() == 4 and mp._warmup_steps() == 2
    history = mp.run()
    assert len(history) == 4
    assert [(r["s_kv"], r["s_heads"], r["s_ffn"]) for r in history[2:]] == [(1, 1, 64)] * 2
    assert mp.hard_counts() == (1, 1, 64)


def test_a_non_finite_loss_stops_the_run_before_anything_is_updated(monkeypatch):
    """One NaN would spread through AdamW's and the masks' running averages and end in an
    arbitrary top-k: the step is refused with one line, LoRA and masks as they were."""
    import mptool.maskprune as mpm
    from mptool.errors import MptoolError

    d = Dims.from_config(tiny_model("llama").config)
    mp = MaskPrune(tiny_model("llama"), blocks(d.vocab_size, n=16), cfg(steps=4), target=Target(1, 1, 64),
                   ffn_multiple=32)
    mp.run(stop_after=1)
    masks, lora = {k: v.clone() for k, v in mp.state.tensors().items()}, _lora(mp)
    real = mpm.kd_loss
    monkeypatch.setattr(mpm, "kd_loss", lambda *a, **kw: real(*a, **kw) * float("nan"))
    with pytest.raises(MptoolError, match="training diverged at step 2: the loss or its gradient is not finite"):
        mp.step()
    assert all(torch.equal(v, getattr(mp.state, k)) for k, v in masks.items())
    assert all(torch.equal(v, _lora(mp)[n]) for n, v in lora.items())
    assert mp.state.step == 1


def test_massive_channels_finds_exactly_the_planted_one():
    """The largest write of a channel, max_t |x_c| * max_j |W_down[j, c]|, against its layer's
    median: a channel scaled 1e4 stands out, nothing else does, and factor 0 protects nothing."""
    from mptool.baselines import calibrate, massive_channels

    model = tiny_model("llama")
    d = Dims.from_config(model.config)
    plant_massive_channel(model, 1, 37)
    _, d_stats = calibrate(model, blocks(d.vocab_size))
    assert d_stats[1].amax.shape == (d.intermediate_size,)
    found = massive_channels(model, d_stats, 100.0)
    assert found.shape == (d.num_layers, d.intermediate_size)
    assert torch.nonzero(found).tolist() == [[1, 37]]
    assert not massive_channels(model, d_stats, 0.0).any()


@pytest.mark.parametrize("forward", ["binary", "scaled"])
def test_protected_channels_are_kept_at_full_scale_whatever_their_mask(forward):
    """A protected channel's mask is pinned at 1 through the proximal steps, it ranks first in
    every top-k (even at the lowest initial score), and the finished model still equals the
    masked one."""
    from mptool.baselines import Scores

    model = tiny_model("llama")
    d = Dims.from_config(model.config)
    L, I = d.num_layers, d.intermediate_size
    ffn = torch.arange(I, dtype=torch.float32).repeat(L, 1)  # channel 0 ranks last in every layer
    scores = Scores(torch.ones(L, d.num_kv_heads, d.heads_per_group), torch.ones(L, d.num_kv_heads), ffn)
    protected = torch.zeros(L, I, dtype=torch.bool)
    protected[:, 0] = True
    protected[1, 5] = True
    mp = MaskPrune(model, blocks(d.vocab_size), cfg(steps=6, init="wanda-sp", forward=forward, lr_mask=0.3),
                   target=Target(d.num_kv_heads, d.heads_per_group, I // 4), ffn_multiple=16,
                   init_scores=scores, protected=protected)
    mp.run()
    assert bool((mp.state.zf[protected] == 1.0).all())
    sliced, keeps, rel = finish_against_masked(mp, blocks(d.vocab_size, 2, 9))
    assert rel <= 1e-5
    assert all(0 in k.ffn and len(k.ffn) == I // 4 for k in keeps)
    assert 5 in keeps[1].ffn
    unprotected = MaskPrune(tiny_model("llama"), blocks(d.vocab_size), cfg(steps=6, init="wanda-sp"),
                            target=Target(d.num_kv_heads, d.heads_per_group, I // 4), ffn_multiple=16,
                            init_scores=scores)
    unprotected.run()
    assert not any(0 in k.ffn for k in unprotected.keeps())  # the ranking alone would drop it


def test_a_checkpoint_keeps_the_protected_set_it_began_with(tmp_path):
    """Resume uses the saved protected channels, not a set recomputed on another device; a
    checkpoint from before protection existed restores none."""
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama")
    d = Dims.from_config(model.config)
    protected = torch.zeros(d.num_layers, d.intermediate_size, dtype=torch.bool)
    protected[0, 3] = protected[1, 200] = True
    mp = MaskPrune(model, blocks(d.vocab_size), cfg(steps=2), target=Target(2, 1, 64), ffn_multiple=32,
                   protected=protected)
    mp.run()
    mp.save_checkpoint(tmp_path / "ckpt")
    again = MaskPrune(tiny_model("llama"), blocks(d.vocab_size), cfg(steps=2), target=Target(2, 1, 64),
                      ffn_multiple=32)
    assert not again.protected.any()
    again.load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(again.protected, protected)
    assert all(3 in k.ffn for k in again.keeps()[:1]) and 200 in again.keeps()[1].ffn
    state = load_file(str(tmp_path / "ckpt" / "state.safetensors"))
    del state["protected"]
    save_file(state, str(tmp_path / "ckpt" / "state.safetensors"))
    again.load_checkpoint(tmp_path / "ckpt")
    assert not again.protected.any()


def test_a_checkpoint_missing_or_adding_an_adapter_tensor_is_refused(tmp_path):
    """A LoRA tensor missing from the checkpoint would keep its fresh initialisation (the load is
    non-strict for the frozen base weights); one the model lacks would be dropped. Both refuse."""
    from safetensors.torch import load_file, save_file

    from mptool.errors import MptoolError

    model = tiny_model("llama")
    d = Dims.from_config(model.config)
    mp = MaskPrune(model, blocks(d.vocab_size), cfg(steps=2), target=Target(2, 1, 64), ffn_multiple=32)
    mp.run()
    mp.save_checkpoint(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "state.safetensors"
    state = load_file(str(path))
    lora = sorted(k for k in state if k.startswith("lora."))
    assert lora
    fresh = lambda: MaskPrune(tiny_model("llama"), blocks(d.vocab_size), cfg(steps=2), target=Target(2, 1, 64),  # noqa: E731
                              ffn_multiple=32)
    fresh().load_checkpoint(tmp_path / "ckpt")  # intact: loads
    save_file({k: v for k, v in state.items() if k != lora[0]}, str(path))
    with pytest.raises(MptoolError, match=f"lacks 1 of this model's {len(lora)} trainable tensors"):
        fresh().load_checkpoint(tmp_path / "ckpt")
    save_file({**state, "lora.base_model.model.extra.weight": state[lora[0]].clone()}, str(path))
    with pytest.raises(MptoolError, match="1 tensors this model does not have"):
        fresh().load_checkpoint(tmp_path / "ckpt")
