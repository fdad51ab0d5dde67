"""Where a loader worker's time goes: read, decode, crop/resize, tokenise, collate, IPC.

The training loader's per-sample work, on the Flickr8k-1k shards of data_throughput.py (224 px,
batch 64, 2 worker slots), timed stage by stage in one process with one thread, as a DataLoader
worker runs (torch gives each worker one thread):

- read: the tar members' bytes (``tario.read_piece``, page cache warm);
- text: the json parsed into captions (``decode.parse_text``);
- decode: JPEG to uint8 pixels, at a reduced JPEG scale where it still covers the crop
  (``decode.decode_image``);
- crop/resize/flip: ``transforms.train_transform``;
- tokenise: ``Vocabulary.encode`` of every caption of the sample;
- collate: samples to one ``Batch`` (``batch.collate``);
- other: the rest of the worker's loop (shuffle buffer, per-sample seeds, glue), the wall
  time of the epoch minus the stages above;
- IPC: what moving a batch to the main process costs, outside the worker loop: the worker's
  pickling (torch moves each tensor into shared memory, a copy) and the main process's
  unpickling, with the pickler DataLoader's queues use.

The stages are timed by wrapping the functions the pipeline calls; an epoch without the
wrappers is timed too, so the wrappers' own cost shows. Then the real loader (2 workers,
next epoch read ahead) over the same epochs, for the rate the profile has to explain.

    python benchmarks/loader_profile.py [--epochs 3] [--shards /tmp/cmr-bench-flickr]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import pickle
import platform
import statistics
import sys
import time
from collections import defaultdict
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import psutil
import torch
import torch.multiprocessing  # noqa: F401 - registers the tensor reductions DataLoader's queues use

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_throughput import MEAN, REPO, STD, build_shards  # noqa: E402

from cmr.config import from_dict  # noqa: E402
from cmr.data import pipeline  # noqa: E402
from cmr.data.loader import build_loader, build_vocabulary  # noqa: E402
from cmr.data.pipeline import DataConfig, ShardStream  # noqa: E402
from cmr.data.transforms import normalize  # noqa: E402

STAGES = ("read", "text", "decode", "crop/resize/flip", "tokenise", "collate")


class Timers:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def call(self, stage: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start
        return timed

    def generator(self, stage: str, fn):
        """A generator function whose every step (not its consumer's work) is timed."""
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            inner = fn(*args, **kwargs)
            try:
                while True:
                    start = time.perf_counter()
                    try:
                        item = next(inner)
                    except StopIteration:
                        return
                    finally:
                        self.seconds[stage] += time.perf_counter() - start
                    yield item
            finally:
                inner.close()
        return timed


def run_slots(stream: ShardStream, epoch: int) -> tuple[int, float, list]:
    """Every worker slot of one epoch, one after another in this process: samples, seconds, a
    few batches (for the IPC measurement)."""
    stream.epoch = epoch
    stream.skip_windows = {}
    count, kept, start = 0, [], time.perf_counter()
    for slot in range(stream.num_loader_workers):
        stream.worker_offset = slot
        for batch in stream:
            count += batch.size
            if len(kept) < 4:
                kept.append(batch)
    return count, time.perf_counter() - start, kept


def ipc_seconds(batches: list, repeats: int = 5) -> tuple[float, float, int]:
    """Median seconds per batch to pickle (worker side) and unpickle (main side), and bytes.
    Each pickling gets a fresh copy: a tensor already in shared memory is not copied again."""
    dumps, loads = [], []
    size = 0
    for _ in range(repeats):
        for original in batches:
            batch = copy.deepcopy(original)
            start = time.perf_counter()
            data = ForkingPickler.dumps(batch)
            middle = time.perf_counter()
            pickle.loads(data)
            end = time.perf_counter()
            dumps.append(middle - start)
            loads.append(end - middle)
            size = len(bytes(data))
    return statistics.median(dumps), statistics.median(loads), size


@contextlib.contextmanager
def wrapped(timers: Timers, vocab):
    """The pipeline's stage functions timed while inside."""
    originals = {name: getattr(pipeline, name) for name in
                 ("read_piece", "parse_text", "decode_image", "train_transform", "collate")}
    pipeline.read_piece = timers.generator("read", originals["read_piece"])
    pipeline.parse_text = timers.call("text", originals["parse_text"])
    pipeline.decode_image = timers.call("decode", originals["decode_image"])
    pipeline.train_transform = timers.call("crop/resize/flip", originals["train_transform"])
    pipeline.collate = timers.call("collate", originals["collate"])
    vocab.encode = timers.call("tokenise", vocab.encode)  # instance attribute: the stream's vocab
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(pipeline, name, fn)
        del vocab.encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flickr", type=Path, default=REPO.parent / "shared" / "data" / "flickr8k_1k")
    parser.add_argument("--shards", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cmr-bench-flickr")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs of each kind")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)  # as in a DataLoader worker
    shard_dir = build_shards(args.flickr, args.shards)
    cfg = from_dict(DataConfig, {"shards": str(shard_dir), "batch_size": args.batch_size,
                                 "num_workers": args.workers, "image": {"size": 224}})
    vocab = build_vocabulary(cfg)
    loader = build_loader(cfg, vocab, split="train", mode="train")
    stream = loader.dataset
    run_slots(stream, 100)  # warm: page cache, allocator, imports

    timers = Timers()
    plain, timed = [], []
    for e in range(args.epochs):  # alternating, the same epoch plain and wrapped
        plain.append(run_slots(stream, 200 + e))
        with wrapped(timers, vocab):
            timed.append(run_slots(stream, 200 + e))
    samples = sum(n for n, _, _ in timed)
    wall = sum(s for _, s, _ in timed)
    plain_samples, plain_wall = sum(n for n, _, _ in plain), sum(s for _, s, _ in plain)
    stages = {k: timers.seconds[k] for k in STAGES}
    stages["other"] = wall - sum(stages.values())
    dump_s, load_s, nbytes = ipc_seconds(timed[0][2])

    # The real loader over the same epochs: the rate the profile explains (its workers started
    # and warm first, one untimed epoch).
    loader.end_epoch = 300 + args.epochs
    loader.set_epoch(299)
    for _ in loader:
        pass
    real_count, start = 0, time.perf_counter()
    for epoch in range(300, 300 + args.epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            real_count += normalize(batch.images, MEAN, STD).shape[0]
    real_rate = real_count / (time.perf_counter() - start)
    loader.close()

    per_sample_us = {k: 1e6 * v / samples for k, v in stages.items()}
    ipc_us = 1e6 * (dump_s + load_s) / args.batch_size
    worker_us = 1e6 * plain_wall / plain_samples + 1e6 * dump_s / args.batch_size
    lines = [f"| stage | µs per sample | share of the worker's time |", "|---|---:|---:|"]
    total_us = sum(per_sample_us.values())
    for stage, us in per_sample_us.items():
        lines.append(f"| {stage} | {us:.0f} | {100 * us / total_us:.1f}% |")
    lines.append(f"| sum (wrapped) | {total_us:.0f} | 100% |")
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
                   f"torch {torch.__version__}, Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}",
        "samples_per_epoch": samples // args.epochs,
        "us_per_sample": {k: round(v, 1) for k, v in per_sample_us.items()},
        "us_per_sample_unwrapped": round(1e6 * plain_wall / plain_samples, 1),
        "wrapper_overhead": round(wall / samples / (plain_wall / plain_samples), 3),
        "ipc_us_per_sample": {"pickle (worker)": round(1e6 * dump_s / args.batch_size, 1),
                              "unpickle (main)": round(1e6 * load_s / args.batch_size, 1)},
        "ipc_bytes_per_batch_pickled": nbytes,
        "one_worker_samples_per_s": round(1e6 / worker_us, 1),
        "real_loader_samples_per_s": round(real_rate, 1),
        "real_over_one_worker": round(real_rate * worker_us / 1e6, 2),
    }
    print("\n".join(lines))
    print(f"IPC per sample: pickle {1e6 * dump_s / args.batch_size:.0f} µs (worker) + unpickle "
          f"{1e6 * load_s / args.batch_size:.0f} µs (main) = {ipc_us:.0f} µs")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
