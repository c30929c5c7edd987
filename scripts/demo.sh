#!/usr/bin/env bash
# The README's first command: set everything up, then prune the embedded default model
# (SmolLM2-135M-Instruct) on the embedded Austen corpus, evaluate it and write the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export ORT_DISABLE_TELEMETRY=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-runs/demo}
.venv/bin/mptool compress --ratio 0.2 --max-steps 40 --recovery-steps 20 --out "$OUT" --overwrite "$@"
echo "pruned checkpoint: $OUT (report: $OUT/report.json)" >&2
