# Two commands matter on a fresh machine: `make demo` and `make test`.
# `make install` is idempotent: it only reinstalls when pyproject.toml changed.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[all,dev]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/lmstack run

test: install
	bash scripts/ensure_chromium.sh || true
	$(VPY) -m pytest -q

bench: install
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(VPY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
