# Single entry points. `make test` builds .venv on first use, installs the project with the
# test extras and runs the whole suite; `make demo` runs the main job end to end.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU build of torch by default (a range admitting newer releases would pull a multi-GB CUDA
# build on machines without one installed); on a GPU machine: make test TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test test-fast install demo clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# The main job end to end on the bundled sample (reuses completed stages; see runs/demo/report.md)
demo: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) launcher/demo.py --run-dir runs/demo

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not distributed"

clean-venv:
	rm -rf $(VENV)
