# `make demo` and `make test` work on a fresh machine: each creates the repo-local venv first.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: venv demo test lint bench clean

$(VENV_STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(VENV_STAMP)

venv: $(VENV_STAMP)

demo: $(VENV_STAMP)
	HF_HUB_OFFLINE=1 $(PY) scripts/demo.py

test: $(VENV_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: $(VENV_STAMP)
	$(PY) -m ruff check dfn scripts tests

bench: $(VENV_STAMP)
	HF_HUB_OFFLINE=1 $(PY) scripts/benchmark.py --overwrite  # refreshes outputs/benchmark

clean:
	rm -rf .venv outputs .pytest_cache
