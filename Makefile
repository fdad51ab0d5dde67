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

# The demo: build the emoji shards, check them, train the scaled-down 3-stage schedule on
# CPU (about 5 minutes on 2 cores), evaluate on the test split (with chance level) and draw a
# search grid. Rerunning resumes/continues the same run.
RUN ?= runs/emoji-demo
demo: shards
	$(PY) -m shards validate $(DATA)
	ACCELERATE_USE_CPU=1 $(VENV)/bin/accelerate launch --num_processes 1 --cpu --mixed_precision no \
	    --dynamo_backend no launch/train.py --config configs/emoji_demo.yaml \
	    --set data.shards=$(DATA) --run-dir $(RUN) --resume auto
	$(PY) launch/summary.py $(RUN)
	$(PY) launch/eval.py --run-dir $(RUN) --split test
	$(PY) launch/search.py --run-dir $(RUN) --split test --query "smiling cat face" --top-k 5 --grid $(RUN)/search.png
	@echo "search grid: $(RUN)/search.png   metrics: $(RUN)/eval/test.json   wandb (offline): $(RUN)/wandb"

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not distributed"

bench: $(STAMP)
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/reward_throughput.py
	$(PY) benchmarks/epoch_start.py

clean:
	rm -rf $(VENV) data build *.egg-info
