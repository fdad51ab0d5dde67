"""Streaming shards over http against reading the same shards from the local directory.

The Flickr8k-1k training shards (built as ``data_throughput.py`` builds them) are served by
a threaded HTTP server on 127.0.0.1 from this process; the training loader (224 px, 2
workers, batch 64) reads them once through ``data.shards=http://127.0.0.1:PORT`` (curl,
webdataset's opener) and once from the directory, alternating (local, http, local, ...) so
both see the same machine state. Prints the ratio of median samples/s (goal >= 0.95).

    python benchmarks/remote_speed.py [--flickr ../shared/data/flickr8k_1k] [--epochs 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import torch

from cmr.config import from_dict
from cmr.data.loader import build_loader, build_vocabulary
from cmr.data.pipeline import DataConfig
from data_throughput import REPO, build_shards, time_ours


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(directory: Path) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flickr", type=Path, default=REPO.parent / "shared" / "data" / "flickr8k_1k")
    parser.add_argument("--shards", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cmr-bench-flickr")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)  # the main process only normalises; leave the cores to workers
    shard_dir = build_shards(args.flickr, args.shards)
    server = serve(shard_dir)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    loaders = {}
    for name, shards in (("local", str(shard_dir)), ("http", url)):
        cfg = from_dict(DataConfig, {"shards": shards, "batch_size": args.batch_size,
                                     "num_workers": args.workers, "image": {"size": 224}})
        vocab = build_vocabulary(cfg)
        loaders[name] = build_loader(cfg, vocab, split="train", mode="train")
    rates: dict[str, list[float]] = {"local": [], "http": []}
    for r in range(args.repeats):
        for name, loader in loaders.items():
            rates[name].append(time_ours(loader, args.epochs, first_epoch=r * args.epochs))
        print(f"run {r}: local {rates['local'][-1]:7.1f} samples/s   http {rates['http'][-1]:7.1f} samples/s")
    server.shutdown()
    local, http = statistics.median(rates["local"]), statistics.median(rates["http"])
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
                   f"torch {torch.__version__}",
        "samples_per_epoch": len(loaders["local"]) * args.batch_size,
        "local_samples_per_s": round(local, 1),
        "http_samples_per_s": round(http, 1),
        "ratio": round(http / local, 3),
    }, indent=2))
    print(f"http / local directory = {http / local:.3f}x (goal >= 0.95)")


if __name__ == "__main__":
    main()
