"""Streaming shards over http against reading the same shards from the local directory.

The Flickr8k-1k training shards (built as ``data_throughput.py`` builds them) are served on
127.0.0.1; the training loader (224 px, 2 workers, batch 64) reads them once through
``data.shards=http://127.0.0.1:PORT`` (read in the workers with urllib) and once from the
directory, alternating (local, http, local, ...) so both see the same machine state. Prints
the ratio of median samples/s (goal >= 0.95) and where the extra CPU of http goes: the
server's own CPU seconds and the machine's, per epoch, against the local runs'.

``--server`` picks the server: ``sendfile`` (default) a separate process that sends each file
with ``sendfile(2)``, as nginx or an object store's front end does, so what remains is the
client's cost (the workers' reads); ``thread`` the stdlib ``SimpleHTTPRequestHandler``
in a thread of this process, copying every byte through Python under this process's GIL.

    python benchmarks/remote_speed.py [--flickr ../shared/data/flickr8k_1k] [--epochs 2] [--repeats 3]
                                      [--server sendfile|thread]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
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


class SendfileHandler(QuietHandler):
    """Headers as the stdlib writes them, the body by ``sendfile(2)``: no byte passes through
    Python. ``first_byte_s``: the wait before answering, as an object store's first-byte latency."""

    first_byte_s = 0.0

    def do_GET(self) -> None:
        time.sleep(self.first_byte_s)
        super().do_GET()

    def copyfile(self, source, outputfile) -> None:
        outputfile.flush()
        self.connection.sendfile(source)


def serve_in_thread(directory: Path, first_byte_ms: float) -> tuple[int, callable, psutil.Process | None]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1], server.shutdown, None


def serve_in_process(directory: Path, first_byte_ms: float) -> tuple[int, callable, psutil.Process]:
    """This script with ``--serve DIR`` in a process of its own; it prints its port."""
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(directory), "--first-byte-ms", str(first_byte_ms)],
                            stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    return port, proc.kill, psutil.Process(proc.pid)


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a reader that stops mid-shard (its piece ends there) closes the connection


def serve_forever(directory: str, first_byte_ms: float) -> None:
    SendfileHandler.first_byte_s = first_byte_ms / 1000
    server = QuietServer(("127.0.0.1", 0), functools.partial(SendfileHandler, directory=directory))
    print(server.server_address[1], flush=True)
    server.serve_forever()


def cpu_s(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return times.user + times.system


def machine_cpu_s() -> float:
    times = psutil.cpu_times()
    return times.user + times.system + getattr(times, "softirq", 0.0) + getattr(times, "irq", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flickr", type=Path, default=REPO.parent / "shared" / "data" / "flickr8k_1k")
    parser.add_argument("--shards", type=Path, default=None,
                        help="where the shards are built (default: $TMPDIR/cmr-bench-flickr, -N for other sizes)")
    parser.add_argument("--shard-size", type=int, default=64,
                        help="samples per shard (real datasets: 1,000-10,000; a shard's first byte is paid per shard)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup-epochs", type=int, default=2,
                        help="untimed epochs of each loader first (its workers start, allocators settle)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--server", choices=["sendfile", "thread"], default="sendfile")
    parser.add_argument("--first-byte-ms", type=float, default=0.0,
                        help="sendfile server: wait this long before each answer (an object store's latency)")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # the server process itself
    args = parser.parse_args()
    if args.serve:
        serve_forever(args.serve, args.first_byte_ms)
        return

    torch.set_num_threads(1)  # the main process only normalises; leave the cores to workers
    if args.shards is None:
        name = "cmr-bench-flickr" + ("" if args.shard_size == 64 else f"-{args.shard_size}")
        args.shards = Path(os.environ.get("TMPDIR", "/tmp")) / name
    shard_dir = build_shards(args.flickr, args.shards, args.shard_size)
    port, stop_server, server_proc = (serve_in_process if args.server == "sendfile" else serve_in_thread)(
        shard_dir, args.first_byte_ms)
    url = f"http://127.0.0.1:{port}"
    # http: as shipped (data.open_ahead); http_serial: each shard opened only when reached.
    variants = {"local": (str(shard_dir), True), "http": (url, True), "http_serial": (url, False)}
    loaders = {}
    for name, (shards, ahead) in variants.items():
        cfg = from_dict(DataConfig, {"shards": shards, "batch_size": args.batch_size, "open_ahead": ahead,
                                     "num_workers": args.workers, "image": {"size": 224}})
        vocab = build_vocabulary(cfg)
        loaders[name] = build_loader(cfg, vocab, split="train", mode="train")
    for loader in loaders.values():  # untimed: start the persistent workers, warm the page cache
        time_ours(loader, args.warmup_epochs)
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    machine = dict.fromkeys(loaders, 0.0)  # CPU seconds of the whole machine while each ran
    server_s = dict.fromkeys(loaders, 0.0)
    for r in range(args.repeats):
        for name, loader in loaders.items():
            cpu0, served0 = machine_cpu_s(), cpu_s(server_proc)
            rates[name].append(time_ours(loader, args.epochs, first_epoch=args.warmup_epochs + r * args.epochs))
            machine[name] += machine_cpu_s() - cpu0
            server_s[name] += cpu_s(server_proc) - served0
        print(f"run {r}: " + "   ".join(f"{name} {rates[name][-1]:7.1f}" for name in loaders) + " samples/s")
    stop_server()
    median = {name: statistics.median(values) for name, values in rates.items()}
    epochs = args.repeats * args.epochs
    per_epoch = {name: round(total / epochs, 2) for name, total in machine.items()}
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
                   f"torch {torch.__version__}",
        "server": args.server,
        "first_byte_ms": args.first_byte_ms,
        "samples_per_epoch": len(loaders["local"]) * args.batch_size,
        "samples_per_s": {name: round(value, 1) for name, value in median.items()},
        "ratio_to_local": {name: round(median[name] / median["local"], 3) for name in ("http", "http_serial")},
        "machine_cpu_s_per_epoch": per_epoch,
        "server_cpu_s_per_epoch": ({name: round(server_s[name] / epochs, 3) for name in ("http", "http_serial")}
                                   if server_proc else "in this process (not separable)"),
    }, indent=2))
    print(f"http / local directory = {median['http'] / median['local']:.3f}x (goal >= 0.95); "
          f"without open_ahead {median['http_serial'] / median['local']:.3f}x; extra machine CPU per epoch "
          f"over http: {per_epoch['http'] - per_epoch['local']:+.2f} s")


if __name__ == "__main__":
    main()
