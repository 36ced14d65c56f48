# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: venv test test-fast test-slow test-onednn test-onednn-other lint browser demo clean airflow-up airflow-down

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q -rs tests

# The quick loop (590 tests, a few minutes on 2 cores; `make test`: 662 tests, collected 2026-12-04 20:15 UTC; the suite took 13 min 18 s and `bash .ci/run` 16 min 15 s on a clean clone on the slower machine of that day, 10 min 29 s and 12 min 33 s on the faster one of 04:20 UTC): leaves out the tests marked slow or heavy (pyproject.toml).
test-fast: venv
	$(PY) -m pytest -q -rs -m "not slow and not heavy" tests

# The long variants (every crash point, long soaks, the documented Airflow stack, ...).
test-slow: venv
	$(PY) -m pytest -q -rs -m slow tests

# The builtin model and a CLI pipeline run with oneDNN forced on (any x86 CPU) and off.
ONEDNN_TESTS := tests/test_precision.py tests/test_builtin_model.py tests/test_builtin_pipeline_smoke.py
test-onednn: venv
	TF_ENABLE_ONEDNN_OPTS=1 $(PY) -m pytest -q $(ONEDNN_TESTS)
	TF_ENABLE_ONEDNN_OPTS=0 $(PY) -m pytest -q $(ONEDNN_TESTS)

# CI (after `make test`, which ran ONEDNN_TESTS on the kernel path TensorFlow picks here by
# default, as reported by pipelines.model.onednn): the same files once more, on the other
# path only, so both paths are proven on every run without running one of them twice.
# Left out there: the two tests whose child processes set TF_ENABLE_ONEDNN_OPTS themselves
# (the same test again, whatever this run's setting).
ONEDNN_SAME_EVERYWHERE := \
  --deselect tests/test_builtin_model.py::test_embeddings_agree_with_onednn_on_and_off \
  --deselect tests/test_builtin_model.py::test_bf16_embeddings_stay_close_to_fp32
test-onednn-other: venv
	@other=$$($(PY) -c "from pipelines.model.onednn import onednn_status as s; \
	  st = s(); print(('0' if st.enabled else '1') + ' ' + st.describe())") || exit 1; \
	echo "oneDNN in make test: $${other#* }; now TF_ENABLE_ONEDNN_OPTS=$${other%% *}"; \
	TF_ENABLE_ONEDNN_OPTS=$${other%% *} $(PY) -m pytest -q $(ONEDNN_SAME_EVERYWHERE) $(ONEDNN_TESTS)

# ruff and mypy, configured in pyproject.toml.
LINT_PATHS := pipelines serving catalog_search dags benchmarks tests
lint: venv
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m mypy

# The page test (tests/test_serving_page.py) drives a headless Chromium and is skipped
# without one. Debian's package; needs root (or run the apt-get line with sudo).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	  || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

demo: venv
	$(PY) -m catalog_search.demo --workdir out/demo

# The local Airflow stack of docs/AIRFLOW.md (SQLite under out/airflow), on 127.0.0.1 only;
# `make airflow-up EXPOSE=1` binds the API server to every interface and starts the log servers.
airflow-up: venv
	$(PY) -m pipelines.orchestration.airflow_local up --home out/airflow --data out/data$(if $(EXPOSE), --expose)

airflow-down:
	$(PY) -m pipelines.orchestration.airflow_local down --home out/airflow

clean:
	rm -rf out .pytest_cache
