# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := dp,he,grpc,fl,dev,ray

.PHONY: install demo test test-slow bench clean

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

bench: $(STAMP)
	$(VENV)/bin/secagg bench masking --clients 100 --dim 1e6 --dropout 0.1 --out benchmarks/results/make-bench/masking_complete.json
	$(VENV)/bin/secagg bench masking --clients 100 --dim 1e6 --dropout 0.1 --graph sparse --out benchmarks/results/make-bench/masking_sparse.json
	$(VENV)/bin/secagg bench ckks --clients 10 --dim 1e5 --out benchmarks/results/make-bench/ckks.json

clean:
	rm -rf $(VENV) build *.egg-info
