# Two commands set up a fresh machine and run: `make demo` (the default workflow) and
# `make test` (lint + tests). Both create .venv and install pinned versions first.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# torch first and pinned: on a CPU-only machine this takes the CPU wheel; on a GPU
# machine install the CUDA build of the same version into $(VENV) before `make`.
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint unit workflow-tests clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/snakemake --cores all

lint: setup
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint --cores 1

test: lint
	$(BIN)/pytest

clean:
	rm -rf results resources logs benchmarks .snakemake report.html
