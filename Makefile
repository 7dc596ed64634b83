# Every target creates the virtual environment and installs Bisik from pyproject.toml first;
# `make test` adds the test tools and Debian's Chromium.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
TEST_INSTALLED := $(VENV)/.installed-test
# Installing Debian packages needs root; elsewhere sudo asks for it.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install dev demo test clean

DEMO_FILE ?= ../shared/data/rees46/2019-Oct-first-3h.csv
DEMO_ARGS ?=

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	touch $(INSTALLED)

# The test tools come on top. Debian's Chromium is for the track.js browser test, which launches
# /usr/bin/chromium through Playwright; `playwright install`, which downloads a browser build,
# is never run.
$(TEST_INSTALLED): $(INSTALLED)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	test -x /usr/bin/chromium || $(SUDO) sh -c 'apt-get update -q && apt-get install -y -q chromium'
	touch $(TEST_INSTALLED)

install: $(INSTALLED)

## Start the whole local stack: PostgreSQL, Temporal and its Web UI, SMTP sink, API, worker.
dev: $(INSTALLED)
	$(BIN)/bisik dev

## Replay real shop data through a fresh stack, wait for the journeys, print a report.
## Pass DEMO_ARGS=--keep-running to browse the Temporal UI and the stored mail afterwards.
demo: $(INSTALLED)
	$(BIN)/bisik demo $(DEMO_FILE) $(DEMO_ARGS)

## Run the test suite against real PostgreSQL, Temporal and SMTP servers.
test: $(TEST_INSTALLED)
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .bisik
