"""MaskPrune on a saved tiny model, for tests/test_distributed.py (run plainly or under torchrun).

    python tests/dist_worker.py MODEL CKPT [--stop-after N] [--resume] [--sharding fsdp] [--out FILE]

Trains 6 steps with learned targets (ratio 0.5) and a checkpoint every 3; ``--stop-after`` ends
after that step (a simulated kill, the checkpoint left in CKPT); ``--resume`` starts from CKPT.
Without ``--stop-after`` it finishes and rank 0 writes the sliced weights (safetensors) and the
kept units (``FILE.json``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from mptool import distributed as D
from mptool.maskprune import MaskPrune, MaskPruneConfig
from mptool.models import load_model
from mptool.shapes import Dims, prunable_params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("ckpt")
    ap.add_argument("--stop-after", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--sharding", default="ddp")
    ap.add_argument("--out")
    args = ap.parse_args()
    D.init_from_env()
    model = load_model(args.model)[0]
    d = Dims.from_config(model.config)
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(3, model.config.vocab_size, (16, 32), generator=g)
    cfg = MaskPruneConfig(steps=6, batch_size=4, checkpoint_every=3, bf16=False, init="ones")
    mp = MaskPrune(model, blocks, cfg, budget=0.5 * prunable_params(d, d.dense_target()),
                   ffn_multiple=32, seed=0, sharding=args.sharding)
    if args.resume:
        mp.load_checkpoint(Path(args.ckpt))
    mp.run(checkpoint_dir=Path(args.ckpt), stop_after=args.stop_after)
    if args.stop_after is not None:
        return
    sliced, keeps = mp.finish(reload=lambda: load_model(args.model)[0])
    if D.is_main():
        from safetensors.torch import save_file

        save_file({k: v.clone().contiguous() for k, v in sliced.state_dict().items()}, args.out)
        Path(args.out + ".json").write_text(json.dumps([asdict(k) for k in keeps]))
    D.barrier()


if __name__ == "__main__":
    main()
