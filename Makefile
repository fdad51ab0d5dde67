# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= data/emoji

.PHONY: install demo test test-fast shards bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

shards: $(STAMP)
	$(PY) -m shards build emoji --out $(DATA)

demo: shards
	$(PY) -m shards inspect $(DATA)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not distributed"

bench: $(STAMP)
	$(PY) benchmarks/data_throughput.py

clean:
	rm -rf $(VENV) data build *.egg-info
