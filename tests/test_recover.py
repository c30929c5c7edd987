"""Recovery's data position: after mask learning it trains on the blocks that follow."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from mptool.recover import RecoveryConfig, recover, scheduled_lr


def _recovered(blocks: torch.Tensor, offset: int) -> dict[str, torch.Tensor]:
    student, teacher = tiny_model("llama", seed=1), tiny_model("llama", seed=0)
    cfg = RecoveryConfig(steps=1, batch_size=2, bf16=False, kd_chunk=None)
    merged, _ = recover(student, blocks, cfg, teacher=teacher, offset=offset)
    return {k: v.clone() for k, v in merged.state_dict().items()}


def test_offset_trains_on_the_blocks_from_that_position_and_wraps():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(3, 320, (6, 16), generator=g)
    at3 = _recovered(blocks, offset=3)
    assert all(torch.equal(v, w) for v, w in zip(at3.values(), _recovered(blocks[3:5], 0).values()))
    start = _recovered(blocks, offset=0)
    assert any(not torch.equal(v, w) for v, w in zip(at3.values(), start.values()))  # other blocks, other weights
    wrapped = _recovered(blocks, offset=5)  # the last block, then the first
    assert all(torch.equal(v, w) for v, w in zip(wrapped.values(), _recovered(blocks[[5, 0]], 0).values()))
    assert all(torch.equal(v, w) for v, w in zip(_recovered(blocks, 6).values(), start.values()))


def test_lr_schedules_decay_over_the_steps_recovery_runs():
    lrs = {name: [scheduled_lr(RecoveryConfig(steps=4, lr=1.0, lr_schedule=name), i, 16) for i in range(4)]
           for name in ("constant", "linear", "cosine")}
    assert lrs["constant"] == [1.0] * 4
    assert lrs["linear"] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert lrs["cosine"] == pytest.approx([1.0, 0.853553, 0.5, 0.146447], abs=1e-6)
    # a token budget of 3 steps of 4 x 16 tokens ends recovery first: the decay spans those 3
    short = RecoveryConfig(steps=10, batch_size=4, max_tokens=3 * 64, lr=1.0, lr_schedule="linear")
    assert [scheduled_lr(short, i, 16) for i in range(3)] == pytest.approx([1.0, 2 / 3, 1 / 3])
    with pytest.raises(ValueError, match="lr schedule must be one of constant, linear, cosine"):
        scheduled_lr(RecoveryConfig(lr_schedule="step"), 0, 16)


def test_fresh_recovery_follows_the_lr_schedule(monkeypatch):
    """recover() sets each AdamW step's rate from the schedule (linear: 1, 2/3, 1/3 of lr)."""
    seen = []
    original = torch.optim.AdamW.step

    def recording_step(self, *a, **kw):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    blocks = torch.randint(3, 320, (6, 16), generator=torch.Generator().manual_seed(0))
    cfg = RecoveryConfig(steps=3, batch_size=2, lr=3e-3, lr_schedule="linear", bf16=False, kd_chunk=None)
    recover(tiny_model("llama", seed=1), blocks, cfg, teacher=tiny_model("llama", seed=0))
    assert seen == pytest.approx([3e-3, 2e-3, 1e-3])


def test_clip_grads_scales_to_the_norm_and_returns_the_norm_before():
    from mptool.distributed import clip_grads

    a, b, c = torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True), torch.zeros(3, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # global norm 5; c has no gradient
    assert clip_grads([a, b, c], 1.0) == pytest.approx(5.0)
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.0]), atol=1e-6) and torch.allclose(b.grad, torch.tensor([0.8]))
    assert clip_grads([a, b], None) == pytest.approx(1.0, rel=1e-5)  # measured only, nothing changes
    assert torch.allclose(b.grad, torch.tensor([0.8]))
    assert clip_grads([a, b], 10.0) == pytest.approx(1.0, rel=1e-5) and torch.allclose(a.grad, torch.tensor([0.6, 0.0]))
    assert clip_grads([c], 1.0) == 0.0


def test_recovery_clips_each_step_to_max_grad_norm_and_records_the_norm(monkeypatch):
    """Every AdamW step sees gradients of global norm <= max_grad_norm; the history holds the
    norm before clipping (a guard: 128 constant-rate steps diverged without it)."""
    seen = []
    original = torch.optim.AdamW.step

    def recording_step(self, *a, **kw):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return original(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    blocks = torch.randint(3, 320, (6, 16), generator=torch.Generator().manual_seed(0))
    cfg = RecoveryConfig(steps=3, batch_size=2, lr=3e-3, bf16=False, kd_chunk=None, max_grad_norm=1e-3)
    _, history = recover(tiny_model("llama", seed=1), blocks, cfg, teacher=tiny_model("llama", seed=0))
    norms = [row["grad_norm"] for row in history]
    assert len(norms) == 3 and all(n > 1e-3 for n in norms)  # a random student is far from its teacher
    assert seen == pytest.approx([1e-3] * 3, rel=1e-3)
    seen.clear()
    _, history = recover(tiny_model("llama", seed=1), blocks, RecoveryConfig(
        steps=1, batch_size=2, bf16=False, kd_chunk=None, max_grad_norm=None), teacher=tiny_model("llama", seed=0))
    assert seen == pytest.approx([history[0]["grad_norm"]], rel=1e-4)  # None: unclipped
