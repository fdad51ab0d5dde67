# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= data/emoji

.PHONY: install demo test test-fast shards bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

shards: $(DATA)/train/manifest.json

$(DATA)/train/manifest.json: $(STAMP)
	$(PY) -m shards build emoji --out $(DATA)

# Until the trainer lands (issue 4), the demo builds the default shards, checks them and
# streams one epoch through the training pipeline.
demo: shards
	$(PY) -m shards validate $(DATA)
	$(PY) -m shards inspect $(DATA)
	$(PY) launch/stream.py --config configs/emoji.yaml --set data.shards=$(DATA) --epochs 1

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not distributed"

bench: $(STAMP)
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/reward_throughput.py

clean:
	rm -rf $(VENV) data build *.egg-info
