# Entry points for working on and checking the project (GNU make):
#   make venv    .venv with the locked dependencies (hashes checked), the project in editable mode
#   make lock    requirements*.lock from pyproject.toml, with hashes (keeps existing pins)
#   make infra   RabbitMQ, Redis, the Docker engine, a local image registry and the local images, started
#                or built when missing
#   make run     the whole control plane on this machine (API on :8080)
#   make test    the test suite against the real RabbitMQ and Docker engine
SHELL := /bin/bash
.NOTPARALLEL:
.DEFAULT_GOAL := test

VENV := .venv
BASE_PYTHON ?= $(shell command -v python3.11 || command -v python3)
PYTEST_ARGS ?=

.PHONY: venv lock infra images run test clean

venv: $(VENV)/.installed

# Every dependency comes from the lock, each file checked against its hash; the project
# itself goes on top without resolving anything again.
$(VENV)/.installed: pyproject.toml requirements-test.lock
	test -x $(VENV)/bin/python || $(BASE_PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check --require-hashes -r requirements-test.lock
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

PIP_COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile -q --generate-hashes --strip-extras \
	--allow-unsafe --no-emit-index-url --no-emit-find-links

# The image installs requirements.lock; the venv adds the test tools, pinned to the same versions.
lock:
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check pip-tools
	$(PIP_COMPILE) -o requirements.lock pyproject.toml
	$(PIP_COMPILE) --extra test -c requirements.lock -o requirements-test.lock pyproject.toml

infra:
	bash scripts/ensure-rabbitmq.sh
	bash scripts/ensure-redis.sh
	bash scripts/ensure-docker.sh
	bash scripts/ensure-registry.sh
	bash scripts/build-images.sh

images:
	bash scripts/build-images.sh

# On these machines RabbitMQ listens on loopback only, so bee containers must share the host
# network namespace to reach it; that is an operator's opt-in.
run test: export CP_BEE_NETWORK ?= host
run test: export CP_ALLOW_HOST_NETWORK ?= true

# `controlplane up` prints the API and management UI addresses once it is listening.
run: venv infra
	exec $(VENV)/bin/controlplane up

# Any non-zero pytest status fails the target, including 5 (no tests collected).
test: venv infra
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

clean:
	rm -rf build var
