# Two commands for a new user: `make demo` and `make test`. Both install into .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest workers (pytest-xdist): the suite is CPU-bound and these machines have 2 cores; TEST_WORKERS=0 runs it in
# one process
TEST_WORKERS ?= 2

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/loracl demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
