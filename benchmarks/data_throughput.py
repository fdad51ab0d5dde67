"""Training-pipeline throughput at 224 px against the pipeline webdataset's docs show.

Both read the same Flickr8k shards with 2 DataLoader workers and deliver normalised float
batches of 64 in the main process:

- reference: ``wds.WebDataset(...).shuffle().decode("pil").to_tuple("jpg", "json")`` with
  torchvision's ``RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize``, batched in
  the workers, through ``wds.WebLoader`` (as in the webdataset README);
- ours: ``cmr.data`` (uint8 decode + augment in workers, uint8 shipped, normalised in the
  main process), which also tokenises the captions.

``--reference-workers persistent`` (the default) gives the reference
``persistent_workers=True``; ``restart`` restarts its workers every epoch, as the README's
snippet does. Runs alternate (ref, ours, ref, ours, ...) so both see the same machine state; the ratio of
medians is printed. Also prints the loader's main-process RSS after epoch 1 and epoch 5.

    python benchmarks/data_throughput.py [--flickr ../shared/data/flickr8k_1k] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import webdataset as wds
from torchvision import transforms

from cmr.config import from_dict
from cmr.data.loader import build_loader, build_vocabulary
from cmr.data.pipeline import DataConfig
from cmr.data.transforms import normalize

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_shards(flickr: Path, out: Path, shard_size: int = 64) -> Path:
    if not (out / "train" / "manifest.json").exists():
        cmd = [sys.executable, "-m", "shards", "build", "jsonl", "--captions", str(flickr / "captions.jsonl"),
               "--images-root", str(flickr), "--out", str(out), "--shard-size", str(shard_size)]
        subprocess.run(cmd, check=True, cwd=REPO)
    return out


def reference_loader(shard_dir: Path, batch_size: int, workers: int, persistent: bool = True):
    urls = sorted(str(p) for p in (shard_dir / "train").glob("*.tar"))
    preprocess = transforms.Compose([
        transforms.RandomResizedCrop(224, scale=(0.5, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    dataset = (
        wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node, empty_check=False)
        .shuffle(500)
        .decode("pil")
        .to_tuple("jpg", "json")
        .map_tuple(preprocess, lambda meta: meta["captions"][0])
        .batched(batch_size, partial=False)
    )
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers,
                         persistent_workers=persistent and workers > 0)


def time_reference(shard_dir, batch_size, workers, epochs, persistent=True):
    loader = reference_loader(shard_dir, batch_size, workers, persistent)
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for images, _captions in loader:
            count += images.shape[0]
    return count / (time.perf_counter() - start)


def time_ours(loader, epochs, first_epoch=0, peaks=None):
    # As the trainer does: read no epoch ahead past this run's last (that work would fall
    # outside the timed window, into the reference's).
    loader.end_epoch = first_epoch + epochs
    count, start = 0, time.perf_counter()
    for epoch in range(first_epoch, first_epoch + epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            images = normalize(batch.images, MEAN, STD)
            count += images.shape[0]
            if peaks is not None:  # main process + its DataLoader workers, while they live
                peaks[epoch] = max(peaks.get(epoch, 0.0), rss_mib(with_children=True))
    return count / (time.perf_counter() - start)


def rss_mib(with_children: bool = False) -> float:
    process = psutil.Process()
    procs = [process, *process.children(recursive=True)] if with_children else [process]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flickr", type=Path, default=REPO.parent / "shared" / "data" / "flickr8k_1k")
    parser.add_argument("--shards", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cmr-bench-flickr")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reference-workers", choices=("persistent", "restart"), default="persistent",
                        help="the reference's DataLoader workers live across epochs (persistent_workers=True, "
                             "as any user sets) or restart every epoch (webdataset's README as written)")
    args = parser.parse_args()

    torch.set_num_threads(1)  # the main process only normalises; leave the cores to workers
    shard_dir = build_shards(args.flickr, args.shards)
    persistent = args.reference_workers == "persistent"
    cfg = from_dict(DataConfig, {"shards": str(shard_dir), "batch_size": args.batch_size,
                                 "num_workers": args.workers, "image": {"size": 224}})
    vocab = build_vocabulary(cfg)
    loader = build_loader(cfg, vocab, split="train", mode="train")

    ref_rates, our_rates = [], []
    for r in range(args.repeats):
        ref_rates.append(time_reference(shard_dir, args.batch_size, args.workers, args.epochs, persistent))
        our_rates.append(time_ours(loader, args.epochs, first_epoch=r * args.epochs))
        print(f"run {r}: reference {ref_rates[-1]:7.1f} samples/s   cmr.data {our_rates[-1]:7.1f} samples/s")

    memory_loader, peaks = build_loader(cfg, vocab, split="train", mode="train"), {}
    time_ours(memory_loader, 1, peaks=peaks)
    rss_1 = rss_mib()
    time_ours(memory_loader, 4, first_epoch=1, peaks=peaks)
    rss_5 = rss_mib()

    ref, ours = statistics.median(ref_rates), statistics.median(our_rates)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__}",
        "samples_per_epoch": len(loader) * args.batch_size,
        "reference_workers": args.reference_workers,
        "reference_samples_per_s": round(ref, 1),
        "cmr_samples_per_s": round(ours, 1),
        "ratio": round(ours / ref, 2),
        "rss_mib_after_epoch_1": round(rss_1, 1),
        "rss_mib_after_epoch_5": round(rss_5, 1),
        "rss_ratio_5_over_1": round(rss_5 / rss_1, 3),
        "peak_rss_mib_with_workers_epoch_1": round(peaks[0], 1),
        "peak_rss_mib_with_workers_epoch_5": round(peaks[4], 1),
    }
    print(json.dumps(result, indent=2))
    goal = 1.6 if persistent else 2.0
    print(f"cmr.data / webdataset-docs pipeline ({args.reference_workers} workers) = {ours / ref:.2f}x "
          f"(goal >= {goal}x); "
          f"RSS epoch 5 / epoch 1 = {rss_5 / rss_1:.3f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
