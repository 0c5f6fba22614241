# Two commands on a fresh machine:
#   make demo   provision everything (cached in .cache/), run the main job on the tiny default
#   make test   provision everything (+ Debian's chromium for the browser test), run the test suite
#               (real ComfyUI host included)
SHELL := /bin/bash
VENV := .cache/venv
PY := $(VENV)/bin/python

.PHONY: demo test bootstrap bench clean-cache

bootstrap:
	@scripts/bootstrap >/dev/null

demo: bootstrap
	$(PY) scripts/demo.py

test:
	@scripts/bootstrap --browser >/dev/null
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: bootstrap
	$(PY) bench/blend_speed.py

clean-cache:
	rm -rf .cache
