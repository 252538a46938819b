# syntax=docker/dockerfile:1
# vapi-stream-worker: `vapi-worker run` (the worker) or `vapi-worker simulator` (the Vapi simulator).
#
#   docker build -t vapi-stream-worker:dev .
#   docker run --rm -e KAFKA_BOOTSTRAP_SERVERS=kafka.example.com:9092 \
#       -e VAPI_API_KEY -e VAPI_ASSISTANT_ID -p 6066:6066 vapi-stream-worker:dev
#
# `-e NAME` passes NAME from your shell: the Vapi private key, and the assistant for requests
# that name none (required with the real API). With neither key nor VAPI_BASE_URL the worker
# serves its embedded simulator instead. The README's configuration table lists every setting.
#
# Stage 1 builds wheels for the project and every dependency; stage 2 installs them into a clean
# slim image without compilers, pip caches or sources, and runs as an unprivileged user.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# A compiler only for dependencies that ship no wheel for this platform; it stays in this stage.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it (k8s/deployment.yaml).
RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --no-create-home \
        --home-dir /var/lib/vapi-worker --shell /usr/sbin/nologin worker \
    && install -d -o worker -g worker -m 0750 /var/lib/vapi-worker
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index /wheels/*.whl
# Faust keeps its data directory (<app id>-data) under the working directory: it must be writable.
# Kubernetes mounts an emptyDir here, since the root filesystem is read-only there.
WORKDIR /var/lib/vapi-worker
USER 10001:10001
# /metrics, /healthz and /readyz (WORKER_HTTP_PORT).
EXPOSE 6066
ENTRYPOINT ["vapi-worker"]
CMD ["run"]
