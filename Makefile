# FreeSpeed: `make bench` runs the main job (the benchmark on its built-in default),
# `make test` runs the test suite. Both set themselves up first (.ci/setup: venv, torch,
# a ComfyUI v0.3.64 host found at $COMFYUI_PATH or ~/comfy/ComfyUI, or cloned there).
VENV ?= .venv
PY := $(VENV)/bin/python
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup test bench test-core test-browser thumbnails clean

setup:
	@VENV=$(VENV) ./.ci/setup

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-core: setup
	$(PY) -m pytest tests/core $(PYTEST_ARGS)

# opt-in browser test: headless Chromium (Debian: apt-get install -y chromium chromium-driver) driven by
# playwright-core against a real ComfyUI server; screenshots in tests/browser/out/
test-browser: setup
	@test -x "$${CHROMIUM_PATH:-/usr/bin/chromium}" || { echo "test-browser needs Chromium: apt-get install -y chromium chromium-driver (or set CHROMIUM_PATH)"; exit 1; }
	cd tests/browser && npm install --no-audit --no-fund
	FREESPEED_BROWSER=1 $(PY) -m pytest tests/browser $(PYTEST_ARGS)

# the workflows' template-browser thumbnails (workflows/<name>.jpg), screenshots of each loaded in the real UI
thumbnails:
	FREESPEED_WRITE_THUMBNAILS=1 $(MAKE) test-browser

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf bench/out .pytest_cache
