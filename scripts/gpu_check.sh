#!/usr/bin/env bash
# GPU-host check of issue #6, under 10 minutes: MaskPrune on the GPU (one process, and FSDP over
# two when there are two GPUs), then the vLLM export with its real greedy-parity load on the GPU.
#
#   OUT=/tmp/gpu-check bash scripts/gpu_check.sh                          # a host with mptool[gpu]
#   mkdir -p gpu-check && chmod a+w gpu-check    # the image runs as uid 1000
#   docker run --gpus all --rm -e OUT=/out -v "$PWD/gpu-check:/out" --entrypoint bash \
#       mptool:gpu /src/scripts/gpu_check.sh                              # the project's image
#
# Writes under $OUT: gpu_check.log (everything printed, nvidia-smi, versions), the compress
# report(s) and the vLLM export's report. Variables (optional): MODEL (default: the embedded
# SmolLM2-135M-Instruct), STEPS (mask-learning steps, default 30), BUDGET_S (default 570).
# ALLOW_CPU=1 runs the same steps without a GPU (a dry run of the script itself).
set -euo pipefail

OUT=${OUT:?set OUT to the folder the results go to}
STEPS=${STEPS:-30}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-570}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ORT_DISABLE_TELEMETRY=1 MPTOOL_QUIET=1
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# seconds a step may take: what is left minus what the later steps need, never below 30
budget() { local s=$(( $(left) - $1 )); if [ "$s" -lt 30 ]; then echo "error: out of time budget" >&2; exit 3; fi; echo "$s"; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "== gpu_check.sh $(date -u +%FT%TZ) on $(hostname)"
GPUS=0
if nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; then
  GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')   # honours CUDA_VISIBLE_DEVICES
elif [ "${ALLOW_CPU:-0}" != 1 ]; then
  echo "error: no NVIDIA GPU visible (nvidia-smi failed); run on a GPU host or with docker --gpus all"; exit 2
fi
DEVICE=$([ "$GPUS" -gt 0 ] && echo cuda || echo cpu)
"$PY" -c 'import sys, torch, transformers, peft; print("python", sys.version.split()[0], "torch", torch.__version__,
  "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__,
  "gpus", torch.cuda.device_count())'
MODEL=${MODEL:-$("$PY" -c 'from mptool.models import default_model_dir; print(default_model_dir())')}
TPS=1
[ "$GPUS" -ge 2 ] && TPS=1,2
COMMON=(--ratio 0.5 --max-steps "$STEPS" --recovery-steps 10 --eval-tokens 4096 --device "$DEVICE" --tp "$TPS")

echo "== compress, 1 process on $DEVICE ($(left) s left)"
timeout "$(budget 200)" "$PY" -m mptool.cli compress "$MODEL" "${COMMON[@]}" --out "$WORK/mp50"
cp "$WORK/mp50/report.json" "$OUT/compress_1proc_report.json"

if [ "$GPUS" -ge 2 ] || { [ "$GPUS" -eq 0 ] && [ "${ALLOW_CPU:-0}" = 1 ]; }; then
  echo "== compress, torchrun 2 processes, --sharding fsdp ($(left) s left)"
  timeout "$(budget 150)" "$PY" -m torch.distributed.run --nproc-per-node 2 -m mptool.cli compress \
    "$MODEL" "${COMMON[@]}" --sharding fsdp --out "$WORK/mp50-fsdp"
  cp "$WORK/mp50-fsdp/report.json" "$OUT/compress_fsdp2_report.json"
else
  echo "== one GPU: the 2-process FSDP run is skipped"
fi

echo "== export --target vllm --tp $TPS (real vLLM load, greedy parity) ($(left) s left)"
timeout "$(budget 5)" "$PY" -m mptool.cli export "$WORK/mp50" --target vllm --tp "$TPS" --out "$WORK/mp50-vllm"
cp "$WORK/mp50-vllm/export.json" "$OUT/vllm_export.json"
cat "$WORK/mp50-vllm/serve.sh"
echo "== done in $(( $(date +%s) - START )) s: $(ls "$OUT")"
