# Two commands a new user runs: `make test` and `make bench`. Each creates .venv, installs torch and
# this package (with its compiled extension) from this checkout, and runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The stack: one or more requirements, e.g. TORCH_SPEC="torch==2.11.0 triton==3.6.0" (the GPU machines').
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: test bench build clean gpu-check

# The package is installed editable without its extension: `build` builds pf_kernels._C once, in place.
$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -m pip install -q $(TORCH_SPEC)
	PF_KERNELS_SKIP_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $@

# Builds pf_kernels._C in place, and again when csrc/ changes (ninja recompiles only what changed).
build: $(VENV)/.deps
	$(PY) setup.py -q build_ext --inplace

# Test files spread over TEST_WORKERS pytest-xdist processes (0: none), a file per worker at a time
# (module fixtures such as the Triton AOT compiles run once).
TEST_WORKERS ?= 2
test: build
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: build
	$(PY) -m benchmarks $(BENCH_ARGS)

# On a lent GPU machine (DESIGN.md §8): the python given, no venv, no downloads; builds, tests,
# checks and benchmarks (tests/gpu/check.py); with no GPU every part says SKIPPED and it exits 0.
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) tests/gpu/check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info pf_kernels/*.so
