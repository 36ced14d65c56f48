# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: venv test test-slow demo bench clean

venv: $(STAMP)

$(STAMP): setup.py
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q -m "not slow" tests

test-slow: venv   # the long reliability variants (every crash point)
	$(PY) -m pytest -q -m slow tests

demo: venv
	$(PY) -m pipelines.demo --workdir out/demo

clean:
	rm -rf out .pytest_cache
