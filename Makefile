# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: venv test demo bench clean airflow-up airflow-down

venv: $(STAMP)

$(STAMP): setup.py
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(PY) -m pipelines.demo --workdir out/demo

# The local Airflow stack of docs/AIRFLOW.md (standalone, SQLite under out/airflow).
airflow-up: venv
	$(PY) -m pipelines.airflow_local up --home out/airflow --data out/data

airflow-down:
	$(PY) -m pipelines.airflow_local down --home out/airflow

clean:
	rm -rf out .pytest_cache
