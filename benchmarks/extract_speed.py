"""Feature extraction speed: the real job (launch/extract.py's code: shards -> decode -> forward
-> feature shards) against the same backbone on in-memory batches, in the same run.

    python benchmarks/extract_speed.py --shards data/emoji [--cases efficientnet_lite0@128 ...]
        [--precision auto] [--batch-size 64] [--num-workers 2] [--limit 640]

A case is BACKBONE@SIZE (optionally @contiguous to turn channels_last off). For each, the
reference is the backbone's forward alone on random uint8 batches of that size, normalised on
the device (what the job's compute costs at best); the job's images/s over the reference's is
the loader's efficiency (1.0: the accelerator never waits for decoding). ``--limit`` extracts
only the first shards of the train split holding at least that many images, so a case takes
seconds; both numbers then cover the same images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from cmr.config import from_dict
from cmr.data.source import open_split
from cmr.data.transforms import normalize
from cmr.extract import ExtractConfig, build_backbone_for, compute_dtype, process_state, run_extraction

DEFAULT_CASES = ["efficientnet_lite0@128", "efficientnet_lite0@128@contiguous", "efficientnet_lite0@224",
                 "efficientnet_lite2@260"]


def subset(shards: Path, limit: int, into: Path) -> Path:
    """A dataset of the train split's first shards holding >= ``limit`` images (symlinked)."""
    split = open_split(shards, "train")
    (into / "train").mkdir(parents=True)
    total, names = 0, []
    for path, size in zip(split.paths, split.sizes):
        (into / "train" / path.name).symlink_to(path.resolve())
        names.append(path.name)
        total += size
        if total >= limit:
            break
    manifest = json.loads((split.split_dir / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["name"] in names]
    manifest["num_samples"] = sum(s["num_samples"] for s in manifest["shards"])
    (into / "train" / "manifest.json").write_text(json.dumps(manifest))
    return into


def synthetic_dataset(num_images: int, root: Path) -> Path:
    """A train split of random photos-sized JPEGs, written by the project's own writer."""
    import io

    import numpy as np
    from PIL import Image

    from shards.images import Payload
    from shards.writer import DatasetWriter, encode_sample_json

    rng = np.random.default_rng(0)
    writer = DatasetWriter(root, shard_size=100)
    for i in range(num_images):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        writer.add("train", encode_sample_json([f"photo {i}"], {}, i), Payload("jpg", buf.getvalue()), 1)
    writer.finish(modality="image", builder="benchmarks.extract_speed", builder_version="1", source={}, skipped={})
    return root


def reference_rate(cfg: ExtractConfig, num_images: int, device: torch.device) -> float:
    """Images/s of normalise + forward alone on in-memory uint8 batches."""
    backbone, _, _ = build_backbone_for(cfg, device, cfg.channels_last)
    transform = cfg.transform()
    dtype = compute_dtype(cfg.precision, device)
    batch = torch.randint(0, 256, (cfg.batch_size, 3, transform.size, transform.size), dtype=torch.uint8)

    def step():
        x = normalize(batch.to(device), transform.mean, transform.std)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = backbone(x).float().cpu()
        return out

    step()  # warm-up (cudnn autotune, allocator)
    num_batches = max(1, num_images // cfg.batch_size)
    start = time.perf_counter()
    for _ in range(num_batches):
        step()
    return num_batches * cfg.batch_size / (time.perf_counter() - start)


def run_case(case: str, source: Path, args, device: torch.device) -> dict:
    backbone, size, *rest = case.split("@")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_dict(ExtractConfig, {
            "shards": str(source), "out": str(Path(tmp) / "out"), "backbone": backbone, "image_size": int(size),
            "batch_size": args.batch_size, "num_workers": args.num_workers, "precision": args.precision,
            "channels_last": "contiguous" not in rest})
        summary = run_extraction(cfg, progress=False)
        job = summary["images_per_s"]
        reference = reference_rate(cfg, summary["images"], device)
    return {"case": case, "precision": str(compute_dtype(args.precision, device)).replace("torch.", ""),
            "images": summary["images"], "job_images_per_s": job, "reference_images_per_s": round(reference, 1),
            "ratio": round(job / reference, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=Path("data/emoji"))
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=640, help="images per case (0: the whole train split)")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="instead of --shards: N random 320x240 JPEGs (a GPU machine without data)")
    args = parser.parse_args(argv)
    os.environ.setdefault("ACCELERATE_USE_CPU", "0" if torch.cuda.is_available() else "1")
    device = process_state().device
    with tempfile.TemporaryDirectory() as tmp:
        shards = synthetic_dataset(args.synthetic, Path(tmp) / "synthetic") if args.synthetic else args.shards
        source = subset(shards, args.limit, Path(tmp) / "subset") if args.limit else shards
        rows = [run_case(case, source, args, device) for case in args.cases]
        shutil.rmtree(Path(tmp) / "subset", ignore_errors=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    print(f"device: {name}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"batch {args.batch_size}, {args.num_workers} decode workers")
    print("| case | precision | images | job img/s | forward-only img/s | ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['precision']} | {r['images']} | {r['job_images_per_s']} | "
              f"{r['reference_images_per_s']} | {r['ratio']} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
