# Two commands do all the set-up (see README): `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PROTO_OUT := tpi_node/proto

.PHONY: run test lint format install install-test proto bench clean gpu-check device-check
.DEFAULT_GOAL := run

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Runtime (GGUF files are read natively) + grpcio-tools for the generated wire code.
$(VENV)/.installed-run: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[dev]'
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-run
	$(PIP) install -q -e '.[dev,test]'
	touch $@

# The one wire contract: generated code is rebuilt whenever protos/tpi.proto changes.
# Generated into a temporary folder and moved into place whole, so no process ever imports a
# half-written module.
$(PROTO_OUT)/tpi_pb2.py: protos/tpi.proto $(VENV)/.installed-run
	rm -rf $(PROTO_OUT).tmp && mkdir -p $(PROTO_OUT).tmp
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(PROTO_OUT).tmp --pyi_out=$(PROTO_OUT).tmp --grpc_python_out=$(PROTO_OUT).tmp protos/tpi.proto
	sed -i 's/^import tpi_pb2 as/from . import tpi_pb2 as/' $(PROTO_OUT).tmp/tpi_pb2_grpc.py
	printf '"""Generated from protos/tpi.proto by make (grpc_tools.protoc). Do not edit."""\n' > $(PROTO_OUT).tmp/__init__.py
	rm -rf $(PROTO_OUT) && mv $(PROTO_OUT).tmp $(PROTO_OUT)

# The quantised-matmul kernel (tpi_node/model/qmatmul.c) is compiled for this CPU into the model
# cache on first use; building it here says at once whether a C compiler is there (~1 s when built).
install: $(VENV)/.installed-run $(PROTO_OUT)/tpi_pb2.py
	$(PY) -m tpi_node.model.qkernel
install-test: $(VENV)/.installed-test $(PROTO_OUT)/tpi_pb2.py
	$(PY) -m tpi_node.model.qkernel

# Prepare the embedded default model, then serve it from a local cluster on :8000 (3 nodes, or one
# per core when the machine has fewer cores).
run: install
	$(VENV)/bin/tpi-node prepare
	$(VENV)/bin/tpi-node run --host 127.0.0.1 --port 8000

test: lint
	$(VENV)/bin/tpi-node prepare
	$(PY) -m pytest -q --durations=20 tests

# Style and shape: ruff (lint + format check) and the import-linter contracts in pyproject.toml.
lint: install-test
	$(VENV)/bin/ruff check tpi_node tests scripts
	$(VENV)/bin/ruff format --check tpi_node tests scripts
	$(VENV)/bin/lint-imports

format: install-test
	$(VENV)/bin/ruff check --fix tpi_node tests scripts
	$(VENV)/bin/ruff format tpi_node tests scripts

bench: install-test
	$(PY) scripts/bench_single.py

gpu-check:
	bash scripts/gpu_check.sh

device-check:
	bash scripts/device_check.sh

clean:
	rm -rf $(VENV) $(PROTO_OUT) .pytest_cache
