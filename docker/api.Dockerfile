# The API image: FastAPI + the database migrations + the `consa` CLI, without torch and without CUDA.
# Jobs never run here (the worker image does that): the project is installed with --no-deps over the
# `api` extra's requirements read from pyproject.toml (the `service` extra less the plotting), without the core's torch, transformers and
# safetensors, which only the worker uses (the API reads consa.core's settings, which import none).
# Build from the repository root:  docker build -f docker/api.Dockerfile -t consa-api .
#
# Build arguments (the defaults are the official images and PyPI; a user with Docker Hub changes nothing):
#   BASE           any image with Python >= 3.11 (python:3.12-slim), or a plain Debian/Ubuntu, whose
#                  python3 + python3-venv are then installed from its own package archive
#   PIP_INDEX_URL  the package index (a mirror or a proxy)
ARG BASE=python:3.12-slim
FROM ${BASE}

ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# A virtual environment on every base: an official Python image, or a distribution's python3 whose own
# pip refuses to install into the system (PEP 668).
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv

WORKDIR /app
COPY pyproject.toml README.md ./
# The dependencies first (a layer that stays cached until pyproject.toml changes).
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
deps = [d for d in p['optional-dependencies']['api'] if not d.replace(' ', '').startswith('torch')]; \
open('/tmp/requirements.txt', 'w').write(chr(10).join(deps))" \
    && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY consa ./consa
COPY service ./service
COPY worker ./worker
# The API and `consa keys` import without torch (the build fails otherwise).
RUN pip install --no-deps . && ! python -c 'import torch' 2>/dev/null \
    && python -c 'import service.main, service.keys, consa.cli'

# Non-root; /data holds artifacts (a named volume) and must belong to this user before the volume
# is first mounted, so Docker copies the ownership into the fresh volume.
RUN useradd --create-home --uid 1000 consa && mkdir -p /data/artifacts && chown -R consa:consa /data
USER consa
ENV CONSA_VAR_DIR=/data CONSA_ARTIFACT_DIR=/data/artifacts

EXPOSE 8000
# The container's health is its liveness (/healthz: the process answers), not the system's readiness
# (/readyz is 503 while no worker is alive). The slim images have no curl.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# One process; put several behind a proxy (or raise --workers) when one CPU is not enough.
CMD ["uvicorn", "--factory", "service.main:create_app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
