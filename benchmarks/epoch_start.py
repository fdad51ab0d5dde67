"""The stall at the start of each training epoch, with and without reading the next epoch ahead.

The training loader keeps its DataLoader workers alive across epochs, but a new epoch's
workers start reading only when the epoch's iterator is created: every epoch then begins with
a shuffle-buffer fill and one decoded batch per worker while the accelerator waits. With
``data.prefetch_next_epoch`` (the default) a second set of workers starts the next epoch while
this one runs.

The consumer stands in for an accelerator step: it sleeps ``--step-ms`` per batch, leaving the
CPU to the loader, as a GPU step does. Runs alternate (off, on, off, on, ...) on the same
Flickr8k shards at 224 px with 2 workers; printed: the wait for the first batch of each epoch
after the first (epoch 0 also starts the worker processes), the total data wait, and the
wall-clock ratio on / off.

    python benchmarks/epoch_start.py [--flickr ../shared/data/flickr8k_1k] [--epochs 5] [--step-ms 400]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.data_throughput import build_shards  # noqa: E402
from cmr.config import from_dict  # noqa: E402
from cmr.data.loader import build_loader, build_vocabulary  # noqa: E402
from cmr.data.pipeline import DataConfig  # noqa: E402


def one_run(cfg: DataConfig, vocab, epochs: int, step_s: float) -> dict:
    loader = build_loader(cfg, vocab, split="train", mode="train")
    loader.end_epoch = epochs
    first_waits, total_wait, start = [], 0.0, time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        batches = iter(loader)
        while True:
            t = time.perf_counter()
            batch = next(batches, None)
            wait = time.perf_counter() - t
            if batch is None:
                break
            if loader.batches_done == 1:
                first_waits.append(wait)
            total_wait += wait
            time.sleep(step_s)  # the accelerator's step: the CPU is free for the loader
    return {"seconds": time.perf_counter() - start, "data_wait_s": total_wait,
            "first_batch_wait_s": first_waits, "steps_per_epoch": len(loader)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flickr", type=Path, default=REPO.parent / "shared" / "data" / "flickr8k_1k")
    parser.add_argument("--shards", type=Path, default=Path("/tmp/cmr-bench-flickr"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--step-ms", type=float, default=400.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shards = build_shards(args.flickr, args.shards)
    results: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(args.repeats):
        for ahead in (False, True):
            cfg = from_dict(DataConfig, {"shards": str(shards), "batch_size": 64, "num_workers": args.workers,
                                         "prefetch_next_epoch": ahead, "image": {"size": 224}})
            vocab = build_vocabulary(cfg)
            run = one_run(cfg, vocab, args.epochs, args.step_ms / 1000)
            results[ahead].append(run)
            print(json.dumps({"prefetch_next_epoch": ahead, **run}), flush=True)

    def med(ahead: bool, key: str) -> float:
        return statistics.median(r[key] for r in results[ahead])

    def later_starts(ahead: bool) -> float:  # epochs 1.. (epoch 0 starts the processes)
        return statistics.median(w for r in results[ahead] for w in r["first_batch_wait_s"][1:])

    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}; "
          f"{results[True][0]['steps_per_epoch']} steps of 64 per epoch, {args.epochs} epochs, "
          f"step {args.step_ms:.0f} ms, {args.workers} workers, medians of {args.repeats}")
    print(f"{'':24}{'off':>10}{'on':>10}")
    print(f"{'epoch-start wait (s)':24}{later_starts(False):10.3f}{later_starts(True):10.3f}")
    print(f"{'total data wait (s)':24}{med(False, 'data_wait_s'):10.3f}{med(True, 'data_wait_s'):10.3f}")
    print(f"{'wall-clock (s)':24}{med(False, 'seconds'):10.2f}{med(True, 'seconds'):10.2f}")
    print(f"wall-clock on / off: {med(True, 'seconds') / med(False, 'seconds'):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
