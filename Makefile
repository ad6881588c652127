# fedvault: `make demo` and `make test` work on a fresh machine (they install first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-out
AUDIT_OUT ?= audit-out

export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: install system-deps demo test audit bench bench-smoke soak lint proto clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	rm -rf $(DEMO_OUT)
	$(BIN)/fedvault demo --out $(DEMO_OUT)

# Debian packages the tests drive: Chromium (the dashboard's browser test), promtool
# (the alert rules) and systemd-analyze (the unit files), from the package registry,
# once. Needs root (CI and these machines).
system-deps:
	@need=""; command -v chromium >/dev/null || need="$$need chromium"; \
	command -v promtool >/dev/null || need="$$need prometheus"; \
	command -v systemd-analyze >/dev/null || need="$$need systemd"; \
	if [ -n "$$need" ]; then \
		echo "installing Debian packages:$$need"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$need >/dev/null; \
	fi

# Serial by default. `make test TEST_WORKERS=2` runs two pytest-xdist workers
# (tests/conftest.py keeps each file on one worker): 15 min against 19 here, but on
# two cores a fault scenario beside a Ray simulation missed its 45 s round timeout
# in a clean-clone run (2026-12-06), so CI keeps one.
TEST_WORKERS ?= 0
test: install system-deps
	$(BIN)/pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# The empirical privacy audit (fedvault audit privacy): breast-cancer at ε = 3, once with
# DP-SGD as planned (the claim must hold: exit 0, or the target fails) and once with DP off
# (the same audit must refute the claim: its exit 1 is the expected outcome; 0 means the
# audit has no teeth and fails the target, as does any error).
audit: install
	rm -rf $(AUDIT_OUT)
	$(BIN)/fedvault audit privacy --task breast-cancer --epsilon 3 --out $(AUDIT_OUT)/dp
	$(BIN)/fedvault audit privacy --task breast-cancer --epsilon 3 --no-dp \
		--out $(AUDIT_OUT)/no-dp; rc=$$?; if [ $$rc -ne 1 ]; then \
		echo "make audit: with DP off the audit should refute ε = 3 (exit 1), got exit $$rc"; \
		exit 1; fi

# Not part of `make test`: timings and load, side by side in one run (bench/README.md).
bench: install
	$(BIN)/python -m bench.run

# Every bench section's code path at its smallest size (`bench.run --quick`), so a
# section cannot rot unnoticed; CI runs it after `make test` (~10-15 min on 2 cores).
bench-smoke: install
	$(BIN)/pytest -m bench_smoke tests/test_bench_smoke.py

soak: install
	$(BIN)/python -m bench.soak

# mypy does not follow setuptools' package-dir mapping, so type-check a tree of
# symlinks laid out as the installed package (fedvault/privacy -> privacy/, ...).
TYPECHECK := build/typecheck

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)
	cp -rs $(CURDIR)/fedvault $(TYPECHECK)/fedvault
	for p in privacy coordinator client proto examples; do ln -s $(CURDIR)/$$p $(TYPECHECK)/fedvault/$$p; done
	cd $(TYPECHECK) && $(CURDIR)/$(BIN)/mypy -p fedvault --exclude '_pb2'

proto: install
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto proto/update.proto
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto \
		--grpc_python_out=proto proto/admin.proto
	# The generated service imports its messages as a top-level module; fedvault maps them.
	sed -i 's/^import admin_pb2 as admin__pb2$$/from fedvault.proto import admin_pb2 as admin__pb2/' \
		proto/admin_pb2_grpc.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(AUDIT_OUT) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
