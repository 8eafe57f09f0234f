# Operator targets for exchange-listener. `make` alone lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EL := $(BIN)/exchange-listener
CONFIG ?= deploy/exchange-listener.toml
SIZE ?= small
QUICK ?=

.DEFAULT_GOAL := help
.PHONY: help install test lint demo start stop restart status drain resume failed requeue-failed tail bench chaos

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate setup.cfg setup.py pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## create .venv and install the package with dev tools

test: $(VENV)/.installed ## run the test suite (starts its own redis-server and emulator)
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed ## ruff
	$(BIN)/ruff check exchange_listener workers tests
