# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := dp,he,grpc,fl,dev,ray

# Flower interop runs in a venv of its own: flwr 1.42 pins ray, protobuf, rich and packaging
# below what the main venv holds (see pyproject.toml's `flower` extra).
FLOWER_VENV := .venv-flower
FLOWER_STAMP := $(FLOWER_VENV)/.installed

.PHONY: install demo test test-slow test-flower bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	# torch is pinned to the CPU wheel that lies on this machine's disk; install it first so
	# nothing else pulls a multi-GB CUDA build.
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/secagg demo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

$(FLOWER_STAMP): pyproject.toml Makefile
	test -x $(FLOWER_VENV)/bin/python || $(PYTHON) -m venv $(FLOWER_VENV)
	$(FLOWER_VENV)/bin/python -m pip install --upgrade pip setuptools wheel
	$(FLOWER_VENV)/bin/python -m pip install "torch==2.13.0"
	$(FLOWER_VENV)/bin/python -m pip install -e ".[dp,he,grpc,fl,dev,flower]"
	touch $(FLOWER_STAMP)

# The Flower tests, slow ones included (run_simulation with 10 supernodes), and docs/flower.md.
test-flower: $(FLOWER_STAMP)
	$(FLOWER_VENV)/bin/python -m pytest -q -m "slow or not slow" tests/test_flower.py tests/test_docs.py -k "flower"

bench: $(STAMP)
	$(VENV)/bin/secagg bench masking --clients 100 --dim 1e6 --dropout 0.1 --out benchmarks/results/make-bench/masking_complete.json
	$(VENV)/bin/secagg bench masking --clients 100 --dim 1e6 --dropout 0.1 --graph sparse --out benchmarks/results/make-bench/masking_sparse.json
	$(VENV)/bin/secagg bench ckks --clients 10 --dim 1e5 --out benchmarks/results/make-bench/ckks.json

clean:
	rm -rf $(VENV) $(FLOWER_VENV) build *.egg-info
