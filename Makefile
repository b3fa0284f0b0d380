# One entry point for everything: each target creates the virtualenv it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: install test test-fast lint train bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q attn_jax tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not slow" attn_jax tests

lint: $(STAMP)
	$(BIN)/ruff check attn_jax tests experiments
	$(BIN)/ruff format --check attn_jax tests experiments

clean:
	rm -rf $(VENV) .pytest_cache
