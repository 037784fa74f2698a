# One-command entry points. Each creates .venv if missing and installs what it needs first.
#   make demo   - tiny offline end-to-end run (inspect data, train, evaluate) on 2 CPU cores
#   make test   - the test suite (what CI runs)
#   make lint   - ruff, and import-linter (the package's layers: pyproject.toml [tool.importlinter])
#   make test-latest - the fast subset on the newest versions requirements*.txt allow (own venv; not in CI):
#                 run it on purpose to find a new release's breakage before a newcomer does
#   make constraints - rewrite constraints.txt (the exact set the suite passed with) from .venv
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

LATEST := .venv-latest

.PHONY: setup test lint demo clean test-latest constraints

# constraints.txt pins every package to the version the suite last passed with, so a clean clone (and CI)
# installs the tested set; requirements*.txt keep the ranges a user may install.
$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@# No torch yet: take the CPU build (fast, local) instead of letting pip pull a multi-GB CUDA build.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch -c constraints.txt
	@$(BIN)/python -m pip install -q -r requirements-dev.txt -c constraints.txt
	@touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

demo: setup
	@PATH="$(abspath $(BIN)):$$PATH" bash tools/demo.sh

constraints: setup
	@# The tested set, as pip resolved it: local build labels (+cpu) dropped so a CUDA build satisfies the pin too.
	@{ echo "# Exact versions the test suite last passed with (make constraints; used by make setup and CI)."; \
	   $(BIN)/python -m pip freeze --exclude-editable | sed -E 's/\+[a-z0-9.]+$$//'; } > constraints.txt
	@echo "constraints.txt: $$(grep -c '==' constraints.txt) pinned packages"

test-latest:
	@test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	@$(LATEST)/bin/python -m pip install -q --upgrade pip
	@$(LATEST)/bin/python -c "import torch" 2>/dev/null || $(LATEST)/bin/python -m pip install -q torch==2.13.0
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -r requirements-dev.txt
	$(LATEST)/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|accelerate|peft|trl|datasets)=='
	$(LATEST)/bin/python -m pytest -q -m "not slow"

clean:
	rm -rf outputs/demo
