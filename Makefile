# patchwatch: `make demo` runs the main job, `make test` runs the test suite. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "patchwatch needs Python 3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# The main job: train, export, serve, attack and audit as Ray jobs, monitor a camera, report (prints the page).
demo: $(STAMP)
	$(BIN)/patchwatch demo --out runs/demo

# -X faulthandler: a crash after pytest's own handler is gone (a native thread at exit) still prints every thread's stack;
# --durations: CI's log names the slowest tests, where the suite's time goes
test: $(STAMP)
	$(BIN)/python -X faulthandler -m pytest -q -rs --durations=30

bench: $(STAMP)
	$(BIN)/python bench/shapes_render.py

clean:
	rm -rf $(VENV) runs .pytest_cache
