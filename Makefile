# Every command a user runs. The first one creates a virtual environment in
# .venv/ and installs requirements.txt into it (plus requirements-dev.txt for
# test and lint); later runs reuse it until a requirements file changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 50051
SERVER ?= localhost:$(PORT)
NAME ?=
RUNTIME := $(VENV)/.runtime-installed
DEV := $(VENV)/.dev-installed

.PHONY: demo test soak bench server client proto lint clean

demo: $(RUNTIME)  ## the whole story in one terminal: a server, two clients, a few tasks
	$(PY) -m tests.demo

test: $(DEV)  ## the whole test suite
	$(PY) -m pytest

soak: $(DEV)  ## the long fault test: 2 x 10,000 tasks under chaos; prints its figures
	$(PY) -m tests.soak

bench: $(DEV)  ## the project against a lean grpcio baseline, in one run; prints a table
	$(PY) -m tests.bench

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
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(RUNTIME): requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(DEV): requirements.txt requirements-dev.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@ $(RUNTIME)
