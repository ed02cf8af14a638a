# Entry points for working on and checking the project (GNU make):
#   make venv    .venv with the project installed in editable mode, plus test tools
#   make infra   RabbitMQ, the Docker engine and the local images, started or built when missing
#   make run     the whole control plane on this machine (API on :8080)
#   make test    the test suite against the real RabbitMQ and Docker engine
SHELL := /bin/bash
.NOTPARALLEL:
.DEFAULT_GOAL := test

VENV := .venv
BASE_PYTHON ?= $(shell command -v python3.11 || command -v python3)
PYTEST_ARGS ?=

.PHONY: venv infra images run test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(BASE_PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

infra:
	bash scripts/ensure-rabbitmq.sh
	bash scripts/ensure-docker.sh
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
