# Set-up-included entry points. `make install` is idempotent: a second run takes seconds.
PY := .venv/bin/python

.PHONY: install test lint
install:
	bash scripts/install.sh

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .

.PHONY: install-timm demo bench
# The demo and the benchmark need only the timm stack: no mmcv/detectron2 build on a fresh machine.
install-timm:
	bash scripts/install.sh timm

demo: install-timm
	$(PY) demo/swap_mnist.py

bench: install-timm
	$(PY) bench/swap_quality.py
