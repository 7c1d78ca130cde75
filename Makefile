# Two commands on a fresh machine:  `make run` (install, then start the app)  and  `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-dev run test lint

# Torch first: with no GPU take the CPU build, since an unpinned torch pulls a multi-GB CUDA build.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || { command -v nvidia-smi >/dev/null && $(PIP) install "torch>=2.4" || $(PIP) install torch==2.13.0; }
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-nodeps.txt

install-dev: install
	$(PIP) install -q -r requirements-dev.txt

run: install
	$(PYTHON) app.py

test: install-dev
	$(PYTHON) -m pytest

lint:
	ruff check .
