# Every target creates the virtual environment and installs Bisik from pyproject.toml first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install dev demo test clean

DEMO_FILE ?= ../shared/data/rees46/2019-Oct-first-3h.csv
DEMO_ARGS ?=

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(INSTALLED)

install: $(INSTALLED)

## Start the whole local stack: PostgreSQL, Temporal and its Web UI, SMTP sink, API, worker.
dev: $(INSTALLED)
	$(BIN)/bisik dev

## Replay real shop data through a fresh stack, wait for the journeys, print a report.
## Pass DEMO_ARGS=--keep-running to browse the Temporal UI and the stored mail afterwards.
demo: $(INSTALLED)
	$(BIN)/bisik demo $(DEMO_FILE) $(DEMO_ARGS)

## Run the test suite against real PostgreSQL, Temporal and SMTP servers.
test: $(INSTALLED)
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .bisik
