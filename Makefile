# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= data/emoji

.PHONY: install slurm demo test test-fast shards features bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

shards: $(DATA)/train/manifest.json

$(DATA)/train/manifest.json: $(STAMP)
	$(PY) -m shards build emoji --out $(DATA)

# The demo: build the emoji shards and check them, extract EfficientNet-Lite0 ImageNet features
# once (cached in $(FEATURES), reused by later runs), train the tutorial's 3-stage schedule on
# them (about 4 minutes on 2 CPU cores), evaluate on the test split (with chance level) and
# search it. Rerunning resumes/continues the same run.
FEATURES ?= data/emoji-lite0-128
RUN ?= runs/emoji-demo
ACCELERATE_CPU := ACCELERATE_USE_CPU=1 $(VENV)/bin/accelerate launch --num_processes 1 --cpu \
    --mixed_precision no --dynamo_backend no

features: $(FEATURES)/train/manifest.json

$(FEATURES)/train/manifest.json: $(DATA)/train/manifest.json
	$(ACCELERATE_CPU) launch/extract.py --shards $(DATA) --out $(FEATURES) \
	    --backbone efficientnet_lite0 --weights imagenet --image-size 128 --num-workers 0

demo: features
	$(PY) -m shards validate $(DATA)
	$(ACCELERATE_CPU) launch/train.py --config configs/emoji_demo.yaml \
	    --set data.shards=$(FEATURES) --run-dir $(RUN) --resume auto
	$(PY) launch/summary.py $(RUN)
	$(PY) launch/eval.py --run-dir $(RUN) --split test
	$(PY) launch/search.py --run-dir $(RUN) --split all --top-k 5 --grid $(RUN)/search.png \
	    --query "smiling cat face" --query "red heart" --query "airplane"
	@echo "search grid: $(RUN)/search.png   metrics: $(RUN)/eval/test.json   wandb (offline): $(RUN)/wandb"

# SLURM and munge for tests/test_slurm.py (a real two-node cluster on this machine, started by
# tests/slurm_cluster.py): installed with apt-get when missing and we are root; otherwise
# those tests skip and say why.
slurm:
	@if ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge \
	      || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge; }; \
	  else echo "slurm-wlm/munge not installed and not root with apt-get: the SLURM tests will skip"; fi; \
	fi

test: $(STAMP) slurm
	$(PY) -m pytest -q --durations=30

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not distributed"

bench: shards
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/data_throughput.py --reference-workers restart
	$(PY) benchmarks/remote_speed.py
	$(PY) benchmarks/reward_throughput.py
	$(PY) benchmarks/epoch_start.py
	$(PY) benchmarks/worker_start.py
	$(PY) benchmarks/extract_speed.py --shards $(DATA)
	$(PY) benchmarks/vocab_coverage.py --shards $(DATA)

clean:
	rm -rf $(VENV) data build *.egg-info
