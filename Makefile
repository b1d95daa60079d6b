# Two commands matter: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint bench screenshot

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m demo

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check litestar_celery_events worker demo
	$(PY) -m mypy
	$(VENV)/bin/lint-imports  # the layers and the no-cycle rule (pyproject.toml [tool.importlinter])

test: lint
	$(PY) -m pytest

$(VENV)/.bench-installed: $(VENV)/.installed bench/anchors-requirements.txt
	$(PY) -m pip install -q -e '.[test,bench]'
	# arq and saq (the asyncio anchors) in a venv of their own: arq pins redis-py < 6.
	$(PYTHON) -m venv $(VENV)-anchors
	$(VENV)-anchors/bin/python -m pip install -q -r bench/anchors-requirements.txt
	touch $@

# Every benchmark side by side (~6-8 min); writes bench/results/results.{md,json}.
bench: $(VENV)/.bench-installed
	$(PY) -m bench

# docs/flower-tasks.png: the demo's events in a real Flower, photographed by headless Chromium.
screenshot: install
	scripts/screenshot/ensure-browser.sh
	$(PY) scripts/flower_screenshot.py --out docs/flower-tasks.png
