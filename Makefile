# One-command setup for the project's machines. `make test` and `make demo` install first if needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo demo-model bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py requirements/dev.txt src/gracevlm/kernels/csrc/gv_int4.c src/gracevlm/kernels/csrc/gv_int8.c src/gracevlm/kernels/csrc/gv_igemm.c src/gracevlm/kernels/csrc/gv_attn.c src/gracevlm/kernels/csrc/gv_norm.c src/gracevlm/kernels/csrc/gv_layer.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/gracevlm demo

demo-model: install
	$(PY) -m gracevlm.demo build --work out/demo-work --out src/gracevlm/demo/model --threads 1

bench: install
	$(PY) benchmarks/bench_int4.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
