# The two commands a new user runs: `make demo` and `make test`. Both create .venv when
# missing and install the package with what they need; nothing has to be installed first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch==2.13.0 (CPU) lies on local disk here; elsewhere pip takes it from PyPI.
WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast test-parity test-sharding test-e2e lint format bench demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(WHEELS) -e '.[test,bench]'
	touch $@

setup: $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Every tier: fast (no torch), parity (vs transformers), sharding (8 simulated devices), e2e.
# Two pytest processes (pytest-xdist), a test file each at a time: the suite's time is XLA
# compiling tiny models, one core per compile. TEST_WORKERS=1 runs it in one process.
TEST_WORKERS ?= 2
test: lint
	$(VENV)/bin/pytest tests -q -n $(TEST_WORKERS) --dist loadfile --durations=10

test-fast test-parity test-sharding test-e2e: setup
	$(VENV)/bin/pytest tests/$(subst test-,,$@) -q

# Also creates benchmarks/.venv-hf-flax (transformers 4.57's Flax models, a peer) on first use.
bench: setup
	$(PY) benchmarks/load_memory.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/decode_floor.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/scaling.py

demo: setup
	$(VENV)/bin/nnx-caption demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
