# fedvault: `make demo` and `make test` work on a fresh machine (they install first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-out

export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: install demo test lint proto bench soak clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	rm -rf $(DEMO_OUT)
	$(BIN)/fedvault demo --out $(DEMO_OUT)

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy fedvault privacy coordinator client examples

proto: install
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto proto/update.proto

clean:
	rm -rf $(VENV) $(DEMO_OUT) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
