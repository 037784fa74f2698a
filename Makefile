# One-command entry points. Each creates .venv if missing and installs what it needs first.
#   make demo   - tiny offline end-to-end run (inspect data, train, evaluate) on 2 CPU cores
#   make test   - the test suite (what CI runs)
#   make lint   - ruff
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test lint demo clean

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@# No torch yet: take the CPU build (fast, local) instead of letting pip pull a multi-GB CUDA build.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	@$(BIN)/python -m pip install -q -r requirements-dev.txt
	@touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

demo: setup
	@PATH="$(abspath $(BIN)):$$PATH" bash tools/demo.sh

clean:
	rm -rf outputs/demo
