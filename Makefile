# Every command a user runs. The first one creates a virtual environment in
# .venv/ with $(PYTHON) and installs requirements.txt into it (plus
# requirements-dev.txt for test and lint); later runs reuse it until a
# requirements file changes, or until PYTHON names another interpreter.
# Without make (Windows): the README lists the plain commands.

PYTHON ?= python3
VENV ?= .venv
ifeq ($(OS),Windows_NT)
  PY := $(VENV)/Scripts/python.exe
else
  PY := $(VENV)/bin/python
endif
PORT ?= 50051
SERVER ?= localhost:$(PORT)
NAME ?=
RUNTIME := $(VENV)/.runtime-installed
DEV := $(VENV)/.dev-installed
MADE_BY := $(VENV)/.made-by

# Which interpreter PYTHON is, and whether it is new enough: checked before
# anything else, so an old one fails with one line instead of pip's errors.
INTERPRETER := $(shell $(PYTHON) -c "import sys; print(sys.executable, sys.version.split()[0])" 2>/dev/null)
ifeq ($(filter clean,$(MAKECMDGOALS)),)
  ifneq ($(shell $(PYTHON) -c "import sys; print(sys.version_info >= (3, 10))" 2>/dev/null),True)
    $(error contact needs Python 3.10 or newer, but PYTHON=$(PYTHON) is $(or $(word 2,$(INTERPRETER)),not a working Python); run make again with PYTHON=python3.12 (or any 3.10+))
  endif
  # A .venv made by another interpreter is made again.
  ifneq ($(shell cat $(MADE_BY) 2>/dev/null),$(INTERPRETER))
    $(shell rm -rf $(VENV))
  endif
endif

.PHONY: demo test soak bench server client proto lint clean

demo: $(RUNTIME)  ## the whole story in one terminal: a server, two clients, a few tasks
	$(PY) -m tests.demo

test: $(DEV)  ## the whole test suite: most tests four at a time (they mostly wait), then the heavy ones alone
	$(PY) -m pytest -n 4 -m "not alone"
	$(PY) -m pytest -m alone

soak: $(DEV)  ## the long fault tests: 2 x 10,000 tasks under chaos, again with --journal and server kills, 200,000 piped lines, and a fleet's reconnect storm of 2,000 clients
	$(PY) -m tests.soak
	$(PY) -m tests.soak --journal
	CONTACT_BURST_LINES=200000 $(PY) -m pytest -q -s tests/test_bounded.py
	$(PY) -m tests.storm --clients 2000

bench: $(DEV)  ## the project against a lean grpcio baseline, in one run, then --queue against memory; prints tables
	$(PY) -m tests.bench
	$(PY) -m tests.bench_fleet

server: $(RUNTIME)  ## a server on PORT; type tasks into it
	$(PY) contact_server.py --port $(PORT)

client: $(RUNTIME)  ## a client of SERVER (NAME=bob to choose its name)
	$(PY) contact_client.py --server $(SERVER) $(if $(NAME),--name $(NAME))

proto: $(RUNTIME)  ## regenerate contact/contact_pb2*.py from contact/contact.proto
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. contact/contact.proto

lint: $(DEV)  ## style and type checks of our code (generated files excluded)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

clean:
	rm -rf .venv .venv-* .pytest_cache .mypy_cache .ruff_cache .hypothesis

$(PY):
	$(PYTHON) -m venv $(VENV)
	@echo "$(INTERPRETER)" > $(MADE_BY)

$(RUNTIME): requirements.txt | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $@

$(DEV): requirements.txt requirements-postgres.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@ $(RUNTIME)
