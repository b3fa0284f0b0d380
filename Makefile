# Every target creates the virtualenv it needs. `make train` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN ?= runs/ding_en_de
EXP ?= experiments/ding_en_de.py
ARGS ?=

.PHONY: install test test-fast soak lint train smoke bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The whole suite on 8 simulated CPU devices (multi-device tests need them), two workers.
test: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -n 2 -q -rfE --durations=15 attn_jax tests

test-fast: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -n 2 -q -m "not slow" attn_jax tests

# The SIGKILL-resume test with 20 kills instead of 5 (a few minutes).
soak: $(STAMP)
	ATTN_JAX_SOAK_KILLS=20 $(BIN)/python -m pytest -q -rfE tests/test_resume.py

lint: $(STAMP)
	$(BIN)/ruff check attn_jax tests experiments
	$(BIN)/ruff format --check attn_jax tests experiments

# The default run: English->German on the Ding sentences (fetched from Debian's trans-de-en on first use),
# at most 20 minutes on 2 CPU cores. Running it again resumes from the newest checkpoint in $(RUN).
train: $(STAMP)
	$(BIN)/attn-jax train --config $(EXP) --workdir $(RUN) $(ARGS)

smoke: $(STAMP)
	$(BIN)/attn-jax train --config experiments/tiny.py --workdir /tmp/attn_jax_smoke $(ARGS)

# The benchmark suite (about an hour on 2 idle CPU cores; nothing else should run meanwhile). Results (JSON,
# Markdown, PNG) go to experiments/results/. PyTorch CPU, the peer, comes with the `bench` extra.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/attn-jax bench all --out experiments/results $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
