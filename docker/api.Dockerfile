# The API image: FastAPI + the database migrations, no CUDA. Jobs never run here (the worker image
# does that), but torch is one of consa's core dependencies, so it is installed first as the CPU
# wheel (~200 MB) before pip would pull the CUDA build (~2.5 GB with its libraries).
# Build from the repository root:  docker build -f docker/api.Dockerfile -t consa-api .
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4"
COPY pyproject.toml README.md ./
COPY consa ./consa
COPY service ./service
COPY worker ./worker
RUN pip install ".[service]"

# Non-root; /data holds artifacts (a named volume) and must belong to this user before the volume
# is first mounted, so Docker copies the ownership into the fresh volume.
RUN useradd --create-home --uid 1000 consa && mkdir -p /data/artifacts && chown -R consa:consa /data
USER consa
ENV CONSA_VAR_DIR=/data CONSA_ARTIFACT_DIR=/data/artifacts

EXPOSE 8000
# One process; put several behind a proxy (or raise --workers) when one CPU is not enough.
CMD ["uvicorn", "--factory", "service.main:create_app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
