# Geryon's two commands: `make demo` and `make test`. Every target sets up the
# project's virtual environment in .venv/ first when it is missing or stale.

PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PROTOS  := $(shell find proto -name '*.proto')

.PHONY: all proto proto-check test test-long demo bench lint clean

all: $(STAMP)

# Fragments add their own targets and prerequisites (e.g. `lint: lint-buf`).
include $(wildcard mk/*.mk)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# Generated code lives in geryon/v1/, mirroring proto/geryon/v1/, so the
# generated imports (from geryon.v1 import ...) need no rewriting.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. \
	    --grpc_python_out=. $(PROTOS)

# CI's guard that nobody edited generated code by hand.
proto-check: proto
	git diff --exit-code -- geryon/v1 || (echo "make: geryon/v1 is stale: run make proto and commit" >&2; exit 1)

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=10

test-long: $(STAMP)
	GERYON_PROPERTY_EXAMPLES=2000 $(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m geryon.demo

bench: $(STAMP)
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.disk
	$(BIN)/python -m bench.replica
	$(BIN)/python -m bench.cpu
	$(BIN)/python -m bench.flood
	$(BIN)/python -m bench.scale

lint: $(STAMP)
	$(BIN)/ruff check geryon tests bench
	$(BIN)/lint-imports .importlinter

clean:
	rm -rf $(VENV) .pytest_cache
