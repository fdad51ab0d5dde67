"""Helpers shared by the ``tests/test_shards_*.py`` files: real image files, reading tars back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]


def noise_image(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A random-pixel image: encodes to distinct bytes for every seed."""
    rng = np.random.default_rng(seed)
    channels = len(Image.new(mode, (1, 1)).getbands())
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def write_image(
    path: Path, size=(32, 24), fmt: str = "JPEG", mode: str = "RGB", seed: int = 0
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(size, mode, seed).save(path, format=fmt)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    """Each record is a dict (dumped as JSON) or raw bytes (written as the line itself)."""
    lines = [
        r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode() for r in records
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def read_split(out_dir: Path, split: str) -> list[dict]:
    """Every sample of a split in key order, read back with plain ``tarfile``:
    ``{"key", "json": {...}, "ext", "data": bytes, "shard"}``."""
    samples: dict[str, dict] = {}
    for shard in sorted((out_dir / split).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                sample = samples.setdefault(key, {"key": key, "shard": shard.name})
                data = tar.extractfile(info).read()
                if ext == "json":
                    sample["json"] = json.loads(data.decode("utf-8"))
                else:
                    sample["ext"], sample["data"] = ext, data
    return [samples[k] for k in sorted(samples)]


def split_dirs(out_dir: Path) -> set[str]:
    return {p.name for p in out_dir.iterdir() if p.is_dir()}


def tar_digests(out_dir: Path) -> dict[str, str]:
    from cmr.data.manifest import sha256_file

    return {str(p.relative_to(out_dir)): sha256_file(p) for p in sorted(out_dir.glob("*/*.tar"))}


def run_cli(
    *args: str, env: dict | None = None, cwd: Path = REPO_ROOT
) -> subprocess.CompletedProcess:
    """``python -m shards ARGS`` in a real subprocess, as a user runs it."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("CMR_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "shards", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=300,
    )


def make_image_dataset(root: Path, num_images: int = 6) -> Path:
    """``root/images/*.{jpg,png}`` plus ``root/captions.jsonl`` covering every split rule."""
    records = []
    for i in range(num_images):
        fmt, ext = ("PNG", "png") if i % 3 == 2 else ("JPEG", "jpg")
        write_image(root / "images" / f"img{i}.{ext}", size=(20 + i, 16), fmt=fmt, seed=i)
        split = ["train", "dev", "test", "none", None, "validation"][i % 6]
        record = {"image": f"images/img{i}.{ext}", "captions": [f"caption {i} a", f"caption {i} b"]}
        if split is not None:
            record["split"] = split
        if i % 2 == 0:
            record["labels"] = {"class": i % 3}
        records.append(record)
    write_jsonl(root / "captions.jsonl", records)
    return root / "captions.jsonl"
