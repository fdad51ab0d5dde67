"""Evaluation speed: every retrieval metric against the one similarity product it needs.

5,000 images x 25,000 captions (5 per image) x 1024-d, random normalised embeddings with each
caption a noisy copy of its image (so recalls are neither 0 nor 100). Timed in alternating
rounds, medians compared, all in one run:

  (a) the floor: one fp32 product ``images @ captions.T`` (5,000 x 25,000);
  (b) ``cmr.eval.metrics.retrieval_metrics``: R@1/5/10, medr, meanr, rsum, mAP@R, mAP@50 in
      both directions (caption relevance). Goal: (b)/(a) <= 1.3, <= 1 GiB extra memory;
  (b') the same with image labels (20 categories: mAP with label relevance), no goal;
  (c) a per-query loop as older evaluation code does it (one matrix-vector product and one
      argsort per query, ranks only), timed on a subset of queries and extrapolated.

Peak extra memory is the highest RSS above the level before the call, sampled every ~2 ms in
a separate untimed run. The exactness check runs (b) and ``brute_force_metrics`` on a smaller
problem (2,500 x 12,500, wide enough for the grouped top-50 selection): rank metrics must be
equal, mAP equal to 1e-9 (float64 sums in a different order).

    python benchmarks/eval_speed.py [--images 5000] [--dim 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from cmr.eval.metrics import brute_force_metrics, retrieval_metrics

CAPTIONS_PER_IMAGE, NOISE, NUM_LABELS = 5, 0.35, 20


def machine_info() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = psutil.virtual_memory().total / 2**30
    return (f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB; "
            f"Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), numpy {np.__version__}")


def make_embeddings(num_images: int, dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=gen), dim=1)
    owner = torch.arange(num_images).repeat_interleave(CAPTIONS_PER_IMAGE)
    noise = NOISE * torch.randn(len(owner), dim, generator=gen)
    captions = torch.nn.functional.normalize(images[owner] + noise, dim=1)
    return images, captions, owner


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_extra_rss(fn) -> float:
    """Highest RSS above the starting level while ``fn`` runs, in MiB (sampled)."""
    process = psutil.Process()
    base, peak, done = process.memory_info().rss, [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(0, peak[0] - base) / 2**20


def per_query_loop(images, captions, owner, num_image_queries: int, num_caption_queries: int):
    """Seconds per image query and per caption query of the argsort-per-query evaluation."""
    images_np, captions_np, owner_np = images.numpy(), captions.numpy(), owner.numpy()
    ranks = []
    start = time.perf_counter()
    for i in range(num_image_queries):
        order = np.argsort(captions_np @ images_np[i])[::-1]
        ranks.append(np.flatnonzero(owner_np[order] == i)[0] + 1)
    per_image = (time.perf_counter() - start) / num_image_queries
    start = time.perf_counter()
    for c in range(num_caption_queries):
        order = np.argsort(images_np @ captions_np[c])[::-1]
        ranks.append(np.flatnonzero(order == owner_np[c])[0] + 1)
    per_caption = (time.perf_counter() - start) / num_caption_queries
    return per_image, per_caption


def exactness(dim: int) -> dict:
    images, captions, owner = make_embeddings(2500, dim, seed=1)
    labels = [i % NUM_LABELS for i in range(len(images))]
    report = {}
    for name, image_labels in (("captions", None), ("labels", labels)):
        ours = retrieval_metrics(images, captions, owner, image_labels=image_labels)
        reference = brute_force_metrics(images, captions, owner, image_labels=image_labels)
        same_keys = ours.keys() == reference.keys()
        ranks_equal = same_keys and all(ours[k] == reference[k] for k in ours if "map" not in k)
        map_diff = max(abs(ours[k] - reference[k]) for k in ours if "map" in k)
        report[name] = {"ranks_equal": ranks_equal, "max_map_diff": map_diff,
                        "ok": ranks_equal and map_diff <= 1e-9}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine_info()}\n")
    images, captions, owner = make_embeddings(args.images, args.dim)
    labels = [i % NUM_LABELS for i in range(args.images)]
    print(f"{args.images} images x {len(captions)} captions x {args.dim}-d")

    def product():
        return images @ captions.T

    def ours(image_labels=None):
        return retrieval_metrics(images, captions, owner, image_labels=image_labels)

    with torch.no_grad():
        first = ours()  # warm-up, and the result the determinism check compares with
        times = {"floor": [], "ours": []}
        for _ in range(args.rounds):  # alternate, so both see the same machine state
            times["floor"].append(seconds(product))
            times["ours"].append(seconds(ours))
        floor, mine = statistics.median(times["floor"]), statistics.median(times["ours"])
        label_time = seconds(lambda: ours(labels))
        deterministic = ours() == first
        memory = [peak_extra_rss(fn) for fn in (product, ours, lambda: ours(labels))]
    per_image, per_caption = per_query_loop(images, captions, owner, 100, 500)
    loop = per_image * args.images + per_caption * len(captions)
    rows = [("(a) one product images @ captions.T", floor, memory[0]),
            ("(b) retrieval_metrics, all metrics", mine, memory[1]),
            (f"(b) with labels ({NUM_LABELS} categories)", label_time, memory[2]),
            ("(c) per-query argsort loop (extrapolated)", loop, None)]
    print(f"\n{'':44}{'seconds':>9}{'vs (a)':>9}{'peak extra MiB':>16}")
    for name, secs, mib in rows:
        print(f"{name:44}{secs:9.2f}{secs / floor:9.2f}{'' if mib is None else f'{mib:.0f}':>16}")
    print(f"\nrounds (a): {', '.join(f'{t:.2f}' for t in times['floor'])}; "
          f"(b): {', '.join(f'{t:.2f}' for t in times['ours'])}")
    ratio = mine / floor
    print(f"goal (b)/(a) <= 1.3: {'met' if ratio <= 1.3 else 'NOT met'} ({ratio:.2f}); "
          f"extra memory <= 1024 MiB: {'met' if memory[1] <= 1024 else 'NOT met'}")
    print(f"deterministic (two runs identical): {deterministic}")
    print(f"same numbers as brute force on 2500 x 12500: {json.dumps(exactness(args.dim))}")
    print(f"metrics: {json.dumps({k: round(v, 3) for k, v in first.items()})}")


if __name__ == "__main__":
    main()
