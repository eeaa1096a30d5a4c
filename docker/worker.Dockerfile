# The worker image: torch + consa + the Celery worker. Two variants (build argument VARIANT):
#   gpu (default)  CUDA torch from the PyTorch image, the production worker:
#                    docker build -f docker/worker.Dockerfile -t consa-worker .
#   cpu            CPU torch on a plain Python (or Debian) base: the whole stack on a laptop, or in CI:
#                    docker build -f docker/worker.Dockerfile -t consa-worker:cpu \
#                      --build-arg VARIANT=cpu --build-arg BASE=python:3.12-slim .
#                  torch comes from a wheel put in docker/wheels/ (e.g. `pip download torch --no-deps
#                  -d docker/wheels` on a machine that has the CPU wheel), else from TORCH_INDEX_URL.
# With flash-attn (compiled from source: needs the -devel base, which has nvcc, and ~30 min):
#   docker build -f docker/worker.Dockerfile -t consa-worker \
#     --build-arg BASE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel --build-arg FLASH_ATTN=1 .
# Other build arguments: PIP_INDEX_URL (the package index: a mirror or a proxy), TORCH_SPEC (the
# torch requirement of the cpu variant).
ARG BASE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE}

ARG VARIANT=gpu
ARG FLASH_ATTN=0
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch>=2.4
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# A virtual environment on every base; it sees the base's packages (the PyTorch image's CUDA torch).
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv

# torch: the base's (gpu), or the CPU build (cpu) from a wheel in docker/wheels/ or the CPU index.
COPY docker/wheels/ /tmp/wheels/
RUN set -e; \
    if [ "$VARIANT" = "cpu" ]; then \
        wheel=$(ls /tmp/wheels/torch-*.whl 2>/dev/null | head -n 1); \
        if [ -n "$wheel" ]; then pip install "$wheel"; \
        else pip install --index-url "$TORCH_INDEX_URL" --extra-index-url "$PIP_INDEX_URL" "$TORCH_SPEC"; fi; \
    elif [ "$VARIANT" = "gpu" ]; then \
        python -c 'import torch; assert torch.version.cuda, "the gpu variant needs a base image with CUDA torch"'; \
    else echo "VARIANT must be gpu or cpu, not $VARIANT" >&2; exit 1; fi; \
    rm -rf /tmp/wheels; python -c 'import torch; print("torch", torch.__version__)'

WORKDIR /app
COPY pyproject.toml README.md ./
COPY consa ./consa
COPY service ./service
COPY worker ./worker
# torch is already installed and satisfies consa's "torch>=2.4", so pip keeps it; `fused`: the search's
# fused RMSNorm / SwiGLU / RoPE kernels (liger-kernel, pure Python over Triton), on the gpu variant.
RUN if [ "$VARIANT" = "gpu" ]; then pip install ".[service,fused]"; else pip install ".[service]"; fi
RUN if [ "$FLASH_ATTN" = "1" ]; then \
        pip install packaging ninja && MAX_JOBS=4 pip install --no-build-isolation "flash-attn>=2.6"; \
    fi

RUN useradd --create-home --uid 1000 consa && mkdir -p /data/artifacts /data/hf && chown -R consa:consa /data
USER consa
# HF_HOME on the data volume: hub downloads survive container restarts and are shared by workers.
ENV CONSA_VAR_DIR=/data CONSA_ARTIFACT_DIR=/data/artifacts HF_HOME=/data/hf

# One job at a time on the one GPU this container sees: solo pool (CUDA does not survive fork) and
# prefetch 1 (an idle worker on another GPU gets the next job, not this busy one).
CMD ["celery", "-A", "worker.celery_app:celery_app", "worker", "--queues", "gpu", "--pool", "solo", \
     "--concurrency", "1", "--prefetch-multiplier", "1", "--loglevel", "INFO"]
