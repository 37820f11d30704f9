# Two entry points, each sets itself up from nothing: `make demo` and `make test`.
PY := .venv/bin/python
STAMP := .venv/.installed
# Where torch comes from. Unset: pip's default index (on Linux x86_64 the CUDA build, several GB).
# make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu   -> the CPU build, about 200 MB
TORCH_INDEX ?=
# Extra arguments for every pip install (a proxy, --find-links DIR, --no-cache-dir, ...).
PIP_ARGS ?=
TORCH_PIP_ARGS := $(if $(strip $(TORCH_INDEX)),--index-url $(TORCH_INDEX))

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q $(PIP_ARGS) --upgrade pip
	$(PY) -m pip install -q $(PIP_ARGS) $(TORCH_PIP_ARGS) torch==2.13.0
	$(PY) -m pip install -q $(PIP_ARGS) -e ".[all,dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	.venv/bin/rmn run configs/demo.yaml --output runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2

clean:
	rm -rf .venv runs
