"""Dry-run the data pipeline of a config: stream epochs and report throughput and skips.

    python launch/stream.py --config configs/emoji.yaml [--epochs 2] [--run-dir runs/x]
    accelerate launch --multi_gpu --num_processes 2 launch/stream.py --config ...   # per rank

With --run-dir, the resolved config and the vocabulary are written there, as a run would.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from accelerate import PartialState

from cmr.config import ConfigError, add_config_arguments, config_from_args
from cmr.data.loader import build_loader, build_vocabulary
from cmr.data.source import DataError
from cmr.experiment import ExperimentConfig
from cmr.run_dir import RunDir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--split", default=None, help="default: data.train_split")
    parser.add_argument("--run-dir", type=Path, default=None)
    args = parser.parse_args()
    cfg = config_from_args(ExperimentConfig, args)
    state = PartialState(cpu=True)
    try:
        vocab = build_vocabulary(cfg.data, cfg.model.text_encoder.glove)
        loader = build_loader(cfg.data, vocab, split=args.split or cfg.data.train_split, mode="train",
                              rank=state.process_index, world_size=state.num_processes)
    except (DataError, ConfigError) as err:
        kind = "config" if isinstance(err, ConfigError) else "data"
        print(f"{kind} error: {err}", file=sys.stderr)
        return 2
    if args.run_dir and state.is_main_process:
        run = RunDir(args.run_dir)
        run.write_config(cfg)
        run.write_vocab(vocab)
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        start, num_samples = time.perf_counter(), 0
        for batch in loader:
            num_samples += batch.num_samples
        seconds = time.perf_counter() - start
        report = {"rank": state.process_index, "epoch": epoch, "batches": len(loader), "samples": num_samples,
                  "samples_per_s": round(num_samples / seconds, 1), "dropped_remainder": loader.num_dropped,
                  "skipped": dict(loader.skip_counts), "vocab_size": len(vocab)}
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
