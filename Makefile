# Two commands a newcomer needs:
#   make run    set up (once) and launch the app on the embedded offline model
#   make test   set up (once, with test tools) and run lint + the whole test suite
PORT ?= 8501
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test setup setup-dev prepare lint format bench protocol

setup:
	@scripts/setup.sh

setup-dev:
	@scripts/setup.sh --dev

prepare: setup
	@$(PY) -m core models prepare

run: prepare
	$(VENV)/bin/streamlit run app.py --server.port $(PORT)

# The paper's protocol on the embedded model (4 arms x 3 seeds in about an hour on 2 CPU cores, 56 min measured, docs/BENCHMARKS.md); ARGS for flags,
# e.g. make protocol ARGS="--preset paper --model meta-llama/Meta-Llama-3-8B-Instruct"
protocol: prepare
	$(PY) -m core protocol $(ARGS)

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: setup-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest

bench: setup-dev
	$(PY) bench/bench_scoring.py
