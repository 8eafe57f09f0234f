# Operator targets for exchange-listener. `make` alone lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EL := $(BIN)/exchange-listener
# Settings file for start/status/failed/...: copy deploy/exchange-listener.example.toml to it.
CONFIG ?= deploy/exchange-listener.toml
SIZE ?= small
# Which mail source the demo and the chaos drill run against: ews (the EWS emulator) or graph
# (the Microsoft Graph emulator, Exchange Online).
SOURCE ?= ews
# The EWS chaos drill's server profile: empty (the emulator's defaults) or onprem (NTLM, HTTPS with a test CA, default throttling policy, Exchange 2019)
PROFILE ?=
QUICK ?=

export EL_BIN := $(CURDIR)/$(BIN)
export EL_RUN_DIR := $(CURDIR)/var/run
export EL_LOG_DIR := $(CURDIR)/var/log
SUPERVISORD := $(BIN)/supervisord -c deploy/supervisord.conf
SUPERVISORCTL := $(BIN)/supervisorctl -c deploy/supervisord.conf

.DEFAULT_GOAL := help
# EXCHANGE_LISTENER_CONFIG is given to supervisord only (make start): exported here it would
# also reach the tests and the demo, which bring their own settings.
.PHONY: config-check help install test test-fast lint demo start stop restart status drain resume failed requeue-failed tail bench chaos

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate setup.cfg setup.py pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## create .venv and install the package with dev tools

# Three test processes on two cores: most of the suite waits on real processes (timeouts,
# backoffs, drills), not the CPU (a run uses about a third of the two cores), so a third process
# takes the whole run from ~7 to ~6 minutes. A file's tests stay in one process (--dist
# loadfile); each process starts its own redis-server, emulators and Dovecot.
test: $(VENV)/.installed ## run the test suite (starts its own redis-server, emulators and Dovecot)
	$(BIN)/python -m pytest -q -n 3 --dist loadfile

# The edit loop: everything but the tests marked slow (drills, supervisord, restarts); under 90 s.
test-fast: $(VENV)/.installed ## run the suite without the slow drills (-m "not slow")
	$(BIN)/python -m pytest -q -n 3 --dist loadfile -m "not slow"

# ruff, then mypy (settings and the strict modules in setup.cfg's [mypy]; .mypy_cache makes a
# rerun take seconds), then the import directions (.importlinter). Every step runs; any failure fails.
lint: $(VENV)/.installed ## ruff, mypy and lint-imports
	@status=0; \
	$(BIN)/ruff check exchange_listener workers emulators tests bench tools || status=1; \
	$(BIN)/mypy || status=1; \
	$(BIN)/lint-imports || status=1; \
	exit $$status

demo: $(VENV)/.installed ## emulator + Redis + listener + workers under supervisord; play replies; print the table (SOURCE=ews|graph|imap)
	$(BIN)/python tools/demo.py --source $(SOURCE)

config-check: $(VENV)/.installed
	@test -f "$(CONFIG)" || { echo "no settings file $(CONFIG): cp deploy/exchange-listener.example.toml $(CONFIG) and edit it (or make ... CONFIG=path)"; exit 2; }

start: config-check ## start listener + workers under supervisord (CONFIG=settings file)
	@mkdir -p "$(EL_RUN_DIR)" "$(EL_LOG_DIR)"
	@if [ -S "$(EL_RUN_DIR)/supervisor.sock" ] && $(SUPERVISORCTL) pid >/dev/null 2>&1; then $(SUPERVISORCTL) start all; \
	else EXCHANGE_LISTENER_CONFIG="$(abspath $(CONFIG))" $(SUPERVISORD); fi
	@sleep 2; $(SUPERVISORCTL) status

stop: ## stop everything (workers finish their running job first) and supervisord
	-$(SUPERVISORCTL) shutdown

restart: ## restart every process (warm: running jobs finish)
	$(SUPERVISORCTL) restart all

status: config-check ## health: listeners, leases, queue, workers, failed jobs (non-zero when unhealthy)
	-@$(SUPERVISORCTL) status 2>/dev/null
	$(EL) status --config "$(CONFIG)"

drain: ## stop taking jobs, let running jobs finish, stop workers (the listener keeps enqueueing)
	$(SUPERVISORCTL) stop 'worker:*'

resume: ## start the workers again after a drain
	$(SUPERVISORCTL) start 'worker:*'

failed: config-check ## list failed jobs with their errors, and given-up notifications
	$(EL) jobs failed --config "$(CONFIG)"

requeue-failed: config-check ## put every failed job back on the queue
	$(EL) jobs requeue-failed --config "$(CONFIG)"

tail: ## follow every process's log
	tail -F $(EL_LOG_DIR)/*.log

bench: $(VENV)/.installed ## benchmarks -> bench-results/*.json and a table (QUICK=1 for a short run)
	$(BIN)/python bench/run_all.py $(if $(QUICK),--quick,)

chaos: $(VENV)/.installed ## fault drill with ground-truth check (SIZE=small|large, SOURCE=ews|graph|imap, PROFILE=onprem for EWS); JSON report as last line
	$(BIN)/python bench/chaos.py --size $(SIZE) --source $(SOURCE) $(if $(PROFILE),--profile $(PROFILE),)
