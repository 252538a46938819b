# Developer and CI entry points. `make help` lists the targets.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
VENV_STAMP := $(VENV)/.installed
LOCAL_KAFKA := bash scripts/local-kafka.sh
PYTEST_ARGS ?=
BENCH_ARGS ?=
TABLE_ARGS ?=

.DEFAULT_GOAL := help
# The lock files: resolved for Python 3.11 on every platform (the image and CI alike), with hashes.
LOCK := $(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 \
	--generate-hashes --custom-compile-command "make lock" --quiet \
	--no-emit-package vapi-stream-client
LOCK_ARGS ?=

.PHONY: help venv lock kafka-jars kafka-up kafka-down lint test check demo bench bench-table bench-gateway

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-11s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

venv: $(VENV_STAMP) ## create .venv (with PY=python3): the locked dev dependencies, then the project (again when the lock changes)

# Hash-checked: every package and version comes from requirements-dev.lock; pip fails on anything
# missing from it. The project itself and its client distribution (clients/python, which the lock
# cannot pin: a local path has no hash) are built with the locked setuptools.
$(VENV_STAMP): pyproject.toml clients/python/pyproject.toml requirements-dev.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e clients/python
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

lock: venv ## resolve requirements-dev.lock and requirements.lock from pyproject.toml again (LOCK_ARGS=--upgrade: newest allowed versions)
	$(LOCK) --extra dev $(LOCK_ARGS) --output-file requirements-dev.lock
	$(LOCK) --constraint requirements-dev.lock --output-file requirements.lock

kafka-jars: ## resolve the local Kafka broker's jars from Maven Central (once; cached in .cache/kafka)
	$(LOCAL_KAFKA) jars

kafka-up: kafka-jars ## start the local Kafka broker on 127.0.0.1 (LOCAL_KAFKA_PORT, default 9092)
	$(LOCAL_KAFKA) up

kafka-down: ## stop the local Kafka broker and remove its log dir
	$(LOCAL_KAFKA) down

lint: venv ## format check, lint and type check
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

test: venv kafka-jars ## run all tests (a broker is started for tests that need one; PYTEST_ARGS=... to narrow)
	$(BIN)/pytest $(PYTEST_ARGS)

check: lint test ## lint, then test: what CI runs

demo: venv kafka-jars ## run the end-to-end demo (scripts/demo.py)
	$(BIN)/python scripts/demo.py

bench: venv kafka-jars ## run the benchmark (python -m bench with BENCH_ARGS=...)
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-table: venv kafka-jars ## measure chat-state recovery time and memory (TABLE_ARGS=--conversations N)
	$(BIN)/python -m bench.table_recovery $(TABLE_ARGS)

bench-gateway: venv kafka-jars ## browsers' event streams on one gateway: latency, CPU, memory (GATEWAY_ARGS=--streams N ...)
	$(BIN)/python -m bench.gateway $(GATEWAY_ARGS)
