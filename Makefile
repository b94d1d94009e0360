# Set-up-included entry points. `make install` is idempotent: a second run takes seconds.
PY := .venv/bin/python

.PHONY: install test
install:
	bash scripts/install.sh

test: install
	$(PY) -m pytest -q
