# make run  - start the daemon on the shipped settings.yaml (creates .venv first)
# make test - create .venv, install mailgate with its test extras, run the whole suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Test workers: one per CPU, at most 4 (the load tests each keep a CPU busy).
JOBS   ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: run test lint bench demo clean

# `run` needs mailgate alone; `test` adds the test tools (pytest, hypothesis, ruff...).
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/mailgate --config settings.yaml run

test: $(BIN)/.installed-test
	$(BIN)/pytest -q -n $(JOBS)

lint: $(BIN)/.installed-test
	$(BIN)/ruff check mailgate tests bench
	$(BIN)/ruff format --check mailgate tests bench

bench: $(BIN)/.installed
	$(BIN)/python bench/ingest.py

# The five-minute tour without the daemon: ingest the samples, list the tickets.
demo: $(BIN)/.installed
	$(BIN)/mailgate --config settings.yaml ingest samples/*.eml
	$(BIN)/mailgate --config settings.yaml tickets list

clean:
	rm -rf $(VENV) var .pytest_cache
