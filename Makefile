# Tally developer commands. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SCALE  ?= small

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/tally: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(BIN)/tally ## create .venv and install Tally with its dev tools

demo: install ## run the platform end to end on the embedded default
	$(BIN)/tally demo

test: install ## run the whole test suite (what CI runs)
	$(BIN)/pytest -q -n 2 --dist loadgroup --durations=60

lint: install ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

format: install ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install ## run every benchmark (SCALE=small|full), writes bench/results/latest.json
	$(BIN)/python bench/run_all.py --scale $(SCALE)

clean: ## remove the venv, caches and local data
	rm -rf $(VENV) .tally .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info

.PHONY: help install demo test lint format bench clean
