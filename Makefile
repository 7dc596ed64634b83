# Every target creates the virtual environment and installs Bisik from pyproject.toml first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install dev test clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(INSTALLED)

install: $(INSTALLED)

## Start the whole local stack: PostgreSQL, Temporal and its Web UI, SMTP sink, API, worker.
dev: $(INSTALLED)
	$(BIN)/bisik dev

## Run the test suite against real PostgreSQL, Temporal and SMTP servers.
test: $(INSTALLED)
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .bisik
