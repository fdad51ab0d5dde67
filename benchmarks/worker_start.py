"""What spawning DataLoader workers (instead of forking them) costs at epoch and eval starts.

A rank runs threads, and forking it can hang the child (issue 10), so workers are spawned
(``data.worker_start_method``). A spawned worker imports torch and cmr before its first
batch; the training lanes' workers persist across epochs, so that cost is paid when a lane
first starts (twice per run with the next-epoch lane), and once by the evaluation loader.
Printed, per start method (fork as the reference, measured in the same run): seconds from
creating the iterator to the first batch, for the first training epoch (workers start), the
second (they persist) and the first evaluation pass; and the whole run's extra seconds
against fork. Runs alternate between methods, ``--repeats`` times, in one process, as in a
rank: the forkserver starts (and imports the pipeline) in the first run only, so its first
row carries that one-off cost and later rows show what each further loader costs.

    python benchmarks/worker_start.py [--shards data/emoji] [--workers 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cmr.config import from_dict  # noqa: E402
from cmr.data.loader import build_loader, build_vocabulary  # noqa: E402
from cmr.data.pipeline import DataConfig  # noqa: E402


def first_batch_s(loader, epoch: int | None = None) -> float:
    if epoch is not None:
        loader.set_epoch(epoch)
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    seconds = time.perf_counter() - start
    for _ in iterator:  # finish the epoch: the next one starts from a clean lane
        pass
    return seconds


def one_run(shards: str, method: str, workers: int) -> dict:
    cfg = from_dict(DataConfig, {"shards": shards, "batch_size": 64, "num_workers": workers,
                                 "image": {"size": 64}, "prefetch_next_epoch": False})
    # fork is refused by the config (it is the hazard); set it after validation for the reference
    object.__setattr__(cfg, "worker_start_method", method)
    vocab = build_vocabulary(cfg)
    train = build_loader(cfg, vocab, split="train", mode="train")
    evaluation = build_loader(cfg, vocab, split="val", mode="eval")
    return {"epoch0_s": first_batch_s(train, 0), "epoch1_s": first_batch_s(train, 1),
            "eval_s": first_batch_s(evaluation)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=str(REPO / "data" / "emoji"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["fork", "spawn", "forkserver"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for _ in range(args.repeats):
        for method in args.methods:
            results[method].append(one_run(args.shards, method, args.workers))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread, "
          f"{args.workers} workers, {args.shards}")
    print("| start method | run | first batch, epoch 0 (s) | epoch 1 (s) | first eval batch (s) | extra vs fork (s) |")
    print("|---|---|---|---|---|---|")
    for method, runs in results.items():
        for i, m in enumerate(runs):
            ref = results["fork"][i] if "fork" in results else None
            # a run starts its training lane(s) once and its eval loader once
            extra = (m["epoch0_s"] + m["eval_s"]) - (ref["epoch0_s"] + ref["eval_s"]) if ref else float("nan")
            print(f"| {method} | {i + 1} | {m['epoch0_s']:.2f} | {m['epoch1_s']:.2f} | {m['eval_s']:.2f} | {extra:+.2f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
