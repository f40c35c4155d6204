# The two commands a new user runs (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.madseg-installed

.PHONY: install demo test lint bench clean

# label-studio-ml goes in without its dependencies: its pins (Flask 1.1.2, Werkzeug 2.0.2, ...) have
# published advisories; what madseg uses of it needs only what pyproject.toml declares (see
# requirements-nodeps.txt). The last line proves LabelStudioMLBase imports on the stack installed.
$(STAMP): pyproject.toml requirements-nodeps.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip wheel setuptools
	$(BIN)/python -m pip install -e '.[dev]'
	$(BIN)/python -m pip install --no-deps -r requirements-nodeps.txt
	$(BIN)/python -c "from label_studio_ml.model import LabelStudioMLBase"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/madseg demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	bash scripts/system-deps.sh
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs test-artifacts .pytest_cache .ruff_cache
