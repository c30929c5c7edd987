#!/usr/bin/env bash
# Host memory per process of `mptool compress` under 2-process FSDP (gloo, CPU), on a random
# 587 M-parameter Llama (hidden 2048, 8 layers, FFN 8192, GQA 32/8, SmolLM2's tokenizer): big
# enough that the weights (2.35 GB in fp32) dominate a process's memory. Only rank 0 reads them;
# the report's "processes" field records each rank's peak RSS.
#
#   bash benchmarks/fsdp_memory.sh            # about 8 minutes on 2 cores; OUT=/tmp/fsdp-memory
#   COMPENSATE=--compensate bash benchmarks/fsdp_memory.sh   # with compensation: 4.6 GB of float64
#                                             # Gram matrices, each process keeping its layers' share
#   SHAPE="--kv-heads 4 --heads-per-group 4 --ffn 4096"       # a fixed shape instead of --ratio 0.5
#                                             # (no legal shapes scored: 32 of them, each solved with
#                                             # compensation in every layer, take 20 min here)
#   METHOD=flap                               # a one-shot method (under FSDP rank 0 alone loads the
#                                             # weights, calibrates, keeps every Gram matrix and cuts;
#                                             # the others get their shards at recovery's wrap)
#
# Writes $OUT/model (the random model, 2.2 GB), $OUT/pruned (with report.json) and prints the
# per-rank peaks. Nothing is downloaded: the tokenizer is the embedded SmolLM2's.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fsdp-memory}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
if [ ! -f "$OUT/model/config.json" ]; then
  "$PY" - "$OUT/model" <<'PYEOF'
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mptool.models import load_model

_, tok = load_model(None, weights=False)  # the embedded SmolLM2's tokenizer (converted once, offline)
cfg = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=8,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                  max_position_embeddings=2048)
torch.manual_seed(0)
LlamaForCausalLM(cfg).save_pretrained(sys.argv[1])
tok.save_pretrained(sys.argv[1])
PYEOF
fi
OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --nproc-per-node 2 -m mptool.cli compress "$OUT/model" \
  --method "${METHOD:-maskprune}" ${SHAPE:---ratio 0.5} --max-steps 2 --recovery-steps 0 "${COMPENSATE:---no-compensate}" --calib-tokens 1024 --eval-tokens 512 \
  --seq-len 128 --sharding fsdp --overwrite --out "$OUT/pruned"
"$PY" -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1]))['processes']))" "$OUT/pruned/report.json"
