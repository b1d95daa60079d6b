# Two commands matter: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# The lowest supported versions run in a venv of their own: Python 3.10 where this machine has it
# (on PATH, or pyenv's), and every dependency at the floor pyproject.toml claims.
LOWEST_VENV ?= .venv-lowest
LOWEST_PYTHON ?= $(firstword $(shell python3.10 -c 'print("python3.10")' 2>/dev/null) \
	$(wildcard $(HOME)/.pyenv/versions/3.10.*/bin/python3.10) $(PYTHON))
LOWEST_PY := $(LOWEST_VENV)/bin/python
LOWEST_PACKAGES := litestar celery kombu redis msgspec anyio click

.PHONY: install demo test test-lowest lint bench screenshot

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
	$(MAKE) --no-print-directory test-lowest

# A fresh venv whenever a floor moves, so nothing newer is left behind from the last install.
$(LOWEST_VENV)/.installed: pyproject.toml ci/lowest-versions.txt
	rm -rf $(LOWEST_VENV)
	$(LOWEST_PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_PY) -m pip install -q --upgrade pip
	$(LOWEST_PY) -m pip install -q -e '.[test]' -r ci/lowest-versions.txt
	touch $@

# The unit tests and every integration test on Redis alone (marked in tests/conftest.py), on the floors.
test-lowest: $(LOWEST_VENV)/.installed
	@$(LOWEST_PY) -c 'import sys; from importlib.metadata import version; \
		print("lowest versions: Python", sys.version.split()[0], *(f"{p}=={version(p)}" for p in sys.argv[1:]))' \
		$(LOWEST_PACKAGES)
	$(LOWEST_PY) -m pytest -m 'not integration or redis'

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
