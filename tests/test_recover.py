"""Recovery's data position: after mask learning it trains on the blocks that follow."""

from __future__ import annotations

import torch

from conftest import tiny_model
from mptool.recover import RecoveryConfig, recover


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
