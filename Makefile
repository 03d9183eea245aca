# Quick start: `make demo` runs the demo, `make test` runs the tests. Both create a local
# .venv on first use and install what they need (idempotent: later runs reuse it and
# rebuild the extension only when its sources change).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMPS := $(VENV)/.stamps
PYTEST_ARGS ?=

# torchsort (a reference for the tests) builds its CPU extension only when no CUDA
# compiler is on PATH, so it is built with every directory holding nvcc removed.
PATH_WITHOUT_NVCC := $(shell printf '%s' "$$PATH" | tr ':' '\n' | while read -r d; do [ -x "$$d/nvcc" ] || echo "$$d"; done | paste -sd:)

.PHONY: demo reskd test install clean

demo: $(STAMPS)/kdfast
	$(PY) -m kdfast.demo

# ResKD on the digits: teacher, plain student, 3-stage chain, accuracy-vs-cost curve
# (runs/reskd/results.json, curve.json and curve.png).
reskd: $(STAMPS)/kdfast
	$(PY) -m kdfast reskd demo --output runs/reskd

test: $(STAMPS)/kdfast $(STAMPS)/torchsort
	$(PY) -m pytest $(PYTEST_ARGS)

install: $(STAMPS)/kdfast

$(STAMPS)/deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt
	mkdir -p $(STAMPS) && touch $@

$(STAMPS)/torchsort: $(STAMPS)/deps
	env PATH="$(PATH_WITHOUT_NVCC)" $(PIP) install --no-build-isolation --no-deps torchsort==0.1.10
	touch $@

$(STAMPS)/kdfast: $(STAMPS)/deps setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info kdfast/*.so
