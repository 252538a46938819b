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
# The build is reproducible: the base image is named by digest, every Python package is the
# version requirements.lock pins (hashes checked; `make lock` regenerates it from pyproject.toml),
# and the project and its client distribution (clients/python) are built with the setuptools of
# that base image. Stage 1 builds the wheels; stage 2 installs them into a clean slim image
# without compilers, pip caches or sources, and runs as an unprivileged user. The engine's
# built-in Dockerfile frontend is used (no `# syntax` image is pulled).

# python:3.11-slim-bookworm as of 2026-09-19 (Python 3.11.16), a multi-platform index: the digest
# docker-library/repo-info lists for that tag (repos/python/remote/3.11-slim-bookworm.md).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# A compiler only for locked packages that ship no wheel for this platform (on arm64,
# faust-streaming); it stays in this stage.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements.lock ./
RUN pip wheel --require-hashes --wheel-dir /wheels -r requirements.lock
COPY clients/python ./clients/python
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels ./clients/python
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it (k8s/deployment.yaml). No
# home directory: the worker writes nothing but temporary files.
RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin worker
# Only the wheels of stage 1, and nothing else (no index): a package missing from them fails here.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index /wheels/*.whl
# The worker writes only under the temporary directory ($TMPDIR, default /tmp): Faust's data
# directory, one per process (worker/app.py). Where the root filesystem is read-only
# (k8s/deployment.yaml), /tmp must be a writable volume; the working directory is never written.
USER 10001:10001
# /metrics, /healthz and /readyz (WORKER_HTTP_PORT).
EXPOSE 6066
ENTRYPOINT ["vapi-worker"]
CMD ["run"]
