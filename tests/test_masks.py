"""The pure mask maths: proximal step, uniform top-k, dual update, schedules, snapping."""

from __future__ import annotations

import pytest
import torch

from mptool import masks as M
from mptool.shapes import Target, continuous_params, prunable_params, snap
from test_shapes import SMOL


def test_proximal_step_is_shift_then_clip():
    z = torch.tensor([[0.05, 0.5, 0.9, 1.0]])
    out = M.proximal_step(z, 0.1, torch.tensor([[1.0]]))
    assert torch.allclose(out, torch.tensor([[0.0, 0.4, 0.8, 0.9]]))
    assert torch.equal(M.proximal_step(torch.tensor([1.5, -0.2]), 0.1, 0.0), torch.tensor([1.0, 0.0]))
    # per-row multipliers broadcast: row 2 is pushed twice as hard
    z2 = torch.full((2, 3), 0.5)
    out2 = M.proximal_step(z2, 0.1, torch.tensor([[1.0], [2.0]]))
    assert torch.allclose(out2[0], torch.full((3,), 0.4)) and torch.allclose(out2[1], torch.full((3,), 0.3))


def test_topk_mask_keeps_exactly_k_per_row():
    scores = torch.randn(7, 50)
    mask = M.topk_mask(scores, 13)
    assert torch.equal(mask.sum(1), torch.full((7,), 13.0))
    kept_min = torch.where(mask.bool(), scores, torch.inf).min(1).values
    dropped_max = torch.where(mask.bool(), -torch.inf, scores).max(1).values
    assert bool((kept_min >= dropped_max).all())


def test_group_topk_is_uniform():
    torch.manual_seed(0)
    g, h = torch.rand(5, 4), torch.rand(5, 4, 3)
    gmask, hmask = M.group_topk(g, h, kv_keep=2, heads_keep=2)
    assert torch.equal(gmask.sum(1), torch.full((5,), 2.0))
    assert torch.equal(hmask.sum((1, 2)), torch.full((5,), 4.0))
    assert torch.equal(hmask.sum(-1), 2 * gmask)  # heads only in kept groups, 2 in each


def test_dual_update_projects_on_nonnegative():
    y = M.dual_update(torch.tensor([0.0, 1.0, 0.2]), torch.tensor([0.5, -0.2, -1.0]), rho=1.0)
    assert torch.allclose(y, torch.tensor([0.5, 0.8, 0.0]))


@pytest.mark.parametrize("target", [0.0, 1.5, 3.0, 4.0])
def test_exact_multiplier_projects_down_onto_the_target_and_never_lifts(target):
    """Rows above the target are projected onto it exactly (order kept); rows at or below it get
    y = 0 and keep their masks, as projected dual ascent would."""
    z = torch.tensor([[1.4, 0.9, 0.2, -0.3], [0.5, 0.5, 0.5, 0.5]])
    y = M.exact_multiplier(z, target, step=0.1)
    after = M.proximal_step(z, 0.1, y.unsqueeze(-1))
    for row in range(2):
        if z[row].clamp(0, 1).sum() > target:
            assert y[row] > 0 and after[row].sum() == pytest.approx(target, abs=1e-4)
        else:
            assert y[row] == 0 and torch.equal(after[row], z[row].clamp(0, 1))
    assert torch.equal(after.argsort(-1, descending=True)[0, :2], torch.tensor([0, 1]))  # order kept


def test_exact_multiplier_keeps_the_initialisation_at_the_dense_target():
    """The first annealing step's target is the dense count: the initial ranking must survive it
    (a signed multiplier lifted every mask to 1 there)."""
    init = M.init_from_scores(torch.rand(2, 16, generator=torch.Generator().manual_seed(0)))
    y = M.exact_multiplier(init, 16.0, step=0.003)
    assert torch.equal(y, torch.zeros(2))
    assert torch.equal(M.proximal_step(init, 0.003, y.unsqueeze(-1)), init)


def test_violation_and_binarity():
    z = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.5, 0.5, 0.5]])
    assert torch.allclose(M.violation(z, 2.0), torch.tensor([0.0, 0.125]))
    assert M.binarity(z) == 3 / 8


def test_anneal_and_straight_through():
    assert M.anneal(10, 4, 0, 6) == 10 and M.anneal(10, 4, 3, 6) == 7 and M.anneal(10, 4, 99, 6) == 4
    soft = torch.tensor([0.3, 0.8, 0.6], requires_grad=True)
    hard = torch.tensor([0.0, 1.0, 1.0])
    out = M.straight_through(soft, hard)
    assert torch.allclose(out, torch.tensor([0.0, 0.8, 0.6]))
    out.sum().backward()
    assert torch.equal(soft.grad, torch.ones(3))  # dropped units still get gradients


def test_init_from_scores_is_rank_linear():
    z = M.init_from_scores(torch.tensor([[3.0, 1.0, 2.0]]))
    assert torch.allclose(z, torch.tensor([[1.0, 0.5, 0.75]]))


def test_continuous_params_equal_integer_counts():
    for t in (Target(3, 3, 1536), Target(2, 3, 768), Target(1, 1, 64)):
        assert continuous_params(SMOL, t.kv_heads, t.heads_per_group, t.ffn) == prunable_params(SMOL, t)


def test_snap_meets_budget_and_is_nearest():
    budget = 0.5 * prunable_params(SMOL, SMOL.dense_target())
    t = snap(SMOL, 2.9, 1.2, 800.0, budget)
    assert prunable_params(SMOL, t) <= budget
    assert t == Target(3, 1, 768)
    t2 = snap(SMOL, 2.0, 3.0, 700.0, budget, tp=(2,))
    assert t2.kv_heads % 2 == 0 and t2.heads % 2 == 0 and prunable_params(SMOL, t2) <= budget


def test_straight_through_binary_runs_the_exact_structure():
    soft = torch.tensor([0.3, 0.8, 0.6], requires_grad=True)
    hard = torch.tensor([0.0, 1.0, 1.0])
    out = M.straight_through_binary(soft, hard)
    assert torch.equal(out.detach(), hard)
    (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(soft.grad, torch.tensor([1.0, 2.0, 3.0]))


def test_chunked_kd_loss_equals_the_whole_one():
    from mptool.maskprune import kd_loss

    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(3, 50, 97, generator=g)
    grads = []
    for chunk in (None, 16, 7):
        student = torch.randn(3, 50, 97, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        loss = kd_loss(student, teacher, 2.0, chunk)
        loss.backward()
        grads.append((loss.detach(), student.grad))
    for loss, grad in grads[1:]:
        assert torch.allclose(loss, grads[0][0], rtol=1e-6)
        assert torch.allclose(grad, grads[0][1], atol=1e-8)
    assert grads[0][0] > 0.1  # a real divergence, not zero


def test_churn_counts_units_that_enter_the_top_k():
    before = torch.tensor([[True, True, False, False], [True, False, True, False]])
    shrink = torch.tensor([[True, False, False, False], [True, False, False, False]])
    assert M.churn(before, shrink) == 0.0  # units only left
    swap = torch.tensor([[True, False, True, False], [False, True, True, False]])
    assert M.churn(before, swap) == 2 / 4  # one new unit in each row, four kept
    assert M.churn(before, torch.zeros_like(before)) == 0.0
