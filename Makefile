# `make test` and `make demo` each create .venv on first use and install what they need.
# torch==2.13.0 goes in first so that pip takes the CPU build on this disk; the project
# itself asks only torch>=2.3, which that build satisfies.
PY      := .venv/bin/python
STAMP   := .venv/.installed

.PHONY: test test-all demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	.venv/bin/lint-imports --no-cache
	$(PY) -m pytest -q

test-all: $(STAMP)
	.venv/bin/lint-imports --no-cache
	$(PY) -m pytest -q -m ''

demo: $(STAMP)
	$(PY) -m attnlab demo

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf .venv runs build *.egg-info src/*.egg-info
