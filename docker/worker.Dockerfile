# The GPU worker image: CUDA + torch from the PyTorch image, consa + the Celery worker on top.
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t consa-worker .
# With flash-attn (compiled from source: needs the -devel base, which has nvcc, and ~30 min):
#   docker build -f docker/worker.Dockerfile -t consa-worker \
#     --build-arg BASE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel --build-arg FLASH_ATTN=1 .
ARG BASE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE}

ARG FLASH_ATTN=0
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY consa ./consa
COPY service ./service
COPY worker ./worker
# torch is already in the base image and satisfies consa's "torch>=2.4", so pip keeps it; `fused`: the
# search's fused RMSNorm / SwiGLU / RoPE kernels (liger-kernel, pure Python over the image's Triton).
RUN pip install ".[service,fused]"
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
