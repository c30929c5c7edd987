#!/usr/bin/env bash
# The README's first command: set everything up, then prune the embedded default model
# (SmolLM2-135M-Instruct) on the embedded Austen corpus, evaluate it and write the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${MPTOOL_VENV:-.venv}
export ORT_DISABLE_TELEMETRY=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${MPTOOL_DEMO_OUT:-runs/demo}
# --overwrite replaces an earlier demo result, never a folder that holds something else
if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ] && [ ! -f "$OUT/report.json" ]; then
  echo "error: $OUT exists and holds no earlier mptool result; set MPTOOL_DEMO_OUT to another folder" >&2
  exit 2
fi
"$VENV/bin/mptool" compress --ratio 0.2 --max-steps 40 --recovery-steps 20 --out "$OUT" --overwrite "$@"
echo "pruned checkpoint: $OUT (report: $OUT/report.json)" >&2
