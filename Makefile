# Two entry points, each sets itself up from nothing: `make demo` and `make test`.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	.venv/bin/rmn run configs/demo.yaml --output runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2

clean:
	rm -rf .venv runs
