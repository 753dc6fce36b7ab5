# modelyard developer commands. `make demo` and `make test` work on a fresh
# machine: they create the virtualenv and start (or install) RabbitMQ and
# PostgreSQL when they are not running.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: all install services demo test lint format bench clean

all: lint test

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

services:
	bash deploy/ensure-services.sh

demo: install services
	$(BIN)/python -m modelyard.demo

test: install services
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install services
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/floor.py
	$(BIN)/python bench/faults.py
	$(BIN)/python bench/gateway_http.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache demo-out
