#!/usr/bin/env bash
# The CPU sweep of benchmarks/README.md, with vLLM on one GPU, in under 10 minutes.
#
#   OUT=/tmp/gpu-bench bash benchmarks/gpu_sweep.sh
#   docker run --gpus all -v "$PWD/out:/out" -e OUT=/out --entrypoint bash mptool:gpu /src/benchmarks/gpu_sweep.sh
#
# Needs a GPU, the mptool GPU environment (`pip install 'mptool[gpu]'` or the project's Docker
# image: vllm with CUDA) and the two model folders. Writes under $OUT:
#   bench_smollm2_gpu.json / .md / .png   the sweep (the same as benchmarks/results/bench_smollm2_cpu.*)
#   gpu_sweep.log                         everything printed, with nvidia-smi and the versions
#
# Variables (all optional):
#   DENSE    dense model folder        (default: the embedded SmolLM2-135M-Instruct, converted once)
#   PRUNED   pruned model folder       (default: runs/smol-mp50, made here by a short MaskPrune run
#                                        when missing: --ratio 0.5, 40 steps; shape is what speed needs)
#   ENGINES  engines to run            (default: vllm; torch also runs on a GPU)
#   REPEATS  timed runs per sweep cell (default: 3)
#   BATCHES / PROMPTS / NEW_TOKENS     the sweep (default 1,8,32 / 128,512 / 32: the CPU sweep)
set -euo pipefail

OUT=${OUT:?set OUT to the folder the results go to}
ENGINES=${ENGINES:-vllm}
REPEATS=${REPEATS:-3}
BATCHES=${BATCHES:-1,8,32}
PROMPTS=${PROMPTS:-128,512}
NEW_TOKENS=${NEW_TOKENS:-32}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-570}   # the whole script stays under 10 minutes
mkdir -p "$OUT"
LOG="$OUT/gpu_sweep.log"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ORT_DISABLE_TELEMETRY=1
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# seconds left minus a reserve, at least 1: "timeout 0" would mean no limit at all
cap() { local t=$(( $(left) - ${1:-0} )); [ "$t" -ge 1 ] && echo "$t" || echo 1; }

echo "== gpu_sweep.sh $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  || { echo "error: no NVIDIA GPU visible (nvidia-smi failed); run on a GPU host or with docker --gpus all"; exit 2; }
"$PY" - "$ENGINES" <<'EOF'
import importlib.util, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
missing = [e for e in sys.argv[1].split(",")
           if importlib.util.find_spec({"onnxruntime": "onnxruntime_genai"}.get(e, e)) is None]
if importlib.util.find_spec("mptool") is None:
    missing.append("mptool")
if missing:
    sys.exit(f"error: not installed here: {', '.join(missing)}; use the mptool GPU image or "
             "pip install 'mptool[gpu]' (or ENGINES=torch for a vLLM-less host)")
if not torch.cuda.is_available():
    sys.exit("error: torch sees no GPU")
EOF

DENSE=${DENSE:-$("$PY" -c 'from mptool.models import default_model_dir; print(default_model_dir())')}
PRUNED=${PRUNED:-runs/smol-mp50}
if [ ! -f "$PRUNED/config.json" ]; then
  echo "== no pruned model at $PRUNED: a short MaskPrune 50% run (shape is what speed depends on)"
  timeout "$(cap 300)" "$PY" -m mptool.cli compress "$DENSE" --ratio 0.5 --max-steps 40 \
    --recovery-steps 0 --eval-tokens 2048 --out "$PRUNED"
fi

# vLLM's GPU start-up (compile + CUDA graph capture) is ~1 min per model; the sweep itself is seconds.
echo "== sweep: $ENGINES, batch $BATCHES, prompt $PROMPTS, $NEW_TOKENS new tokens, $REPEATS repeats ($(left) s left)"
timeout "$(cap)" "$PY" -m mptool.benchmarks.cli "$DENSE" "$PRUNED" --engine "$ENGINES" --device cuda \
  --batch-sizes "$BATCHES" --prompt-lens "$PROMPTS" --new-tokens "$NEW_TOKENS" \
  --warmup 1 --repeats "$REPEATS" --cache-dir "${CACHE_DIR:-/tmp/mptool-bench-cache}" \
  --out "$OUT/bench_smollm2_gpu"
echo "== done in $(( $(date +%s) - START )) s: $(ls "$OUT")"
