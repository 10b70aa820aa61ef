# The .venv is built from python3; torch is pinned to the CPU wheel available offline.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,embedded-redis,k8s]" "$(TORCH_SPEC)"
	touch $(STAMP)

demo: setup
	$(BIN)/switchyard demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/switchyard bench --out bench-results

clean:
	rm -rf $(VENV) .switchyard bench-results
