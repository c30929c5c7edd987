"""Peak host memory of slicing a model, copying (``materialize``) or consuming the dense model
(``materialize(consume=True)``, what a sharded MaskPrune run ends with on rank 0).

    python benchmarks/materialize_memory.py MODEL_DIR [--consume]

Loads the model (fp32), keeps half of every layer's KV groups and FFN channels, and prints the
process's peak RSS after loading and after slicing, with the weights' sizes. Run each mode in its
own process (peak RSS only grows). `bash benchmarks/fsdp_memory.sh` writes a 587 M model to
/tmp/fsdp-memory/model.
"""

from __future__ import annotations

import argparse
import json
import resource

import torch


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    from mptool.models import load_model
    from mptool.shapes import Dims
    from mptool.surgery import LayerKeep, materialize

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--consume", action="store_true")
    args = ap.parse_args()
    model, _ = load_model(args.model, dtype=torch.float32)
    loaded = peak_gb()
    d = Dims.from_config(model.config)
    groups = list(range(d.num_kv_heads // 2))
    keep = LayerKeep(groups, [list(range(d.heads_per_group)) for _ in groups], list(range(d.intermediate_size // 2)))
    dense_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    pruned = materialize(model, [keep] * d.num_layers, consume=args.consume)
    print(json.dumps({"consume": args.consume, "dense_weights_gb": round(dense_gb, 2),
                      "pruned_weights_gb": round(sum(p.numel() * p.element_size() for p in pruned.parameters()) / 1e9, 2),
                      "peak_rss_after_load_gb": round(loaded, 2), "peak_rss_after_slicing_gb": round(peak_gb(), 2)}))


if __name__ == "__main__":
    main()
