# heron: `make run` sets everything up and serves the default model (OpenAI API on 127.0.0.1:8000);
# `make test` sets everything up and runs the test suite. Both create or reuse .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.heron-installed

PROMPT ?= The three most important ideas in computer science are
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install run generate test test-fast bench bench-serve clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/heron serve --host $(HOST) --port $(PORT)

generate: install
	$(VENV)/bin/heron generate --max-tokens 64 "$(PROMPT)"

test: install
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow"

bench: install
	$(VENV)/bin/heron bench throughput --workload W1

bench-serve: install   # against a running `make run`
	$(VENV)/bin/heron bench serve --base-url http://$(HOST):$(PORT) --workload W3

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
