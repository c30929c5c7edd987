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
    with pytest.raises(ValueError, match="lr_schedule must be one of constant, linear, cosine"):
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
