"""Tiny real datasets for the pipeline tests: real PNG/JPEG bytes in real tar shards.

Written here with plain ``tarfile`` (not the project's builder), so the reader is tested
against an independent writer of the format.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from cmr.data.manifest import Manifest, ShardInfo, sha256_file, write_manifest

WORDS = ["red", "green", "blue", "cat", "dog", "ball", "sun", "tree", "car", "boat"]


def image_bytes(index: int, size=(40, 32), fmt="PNG") -> bytes:
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def captions_for(index: int) -> list[str]:
    a, b = WORDS[index % len(WORDS)], WORDS[(index // len(WORDS)) % len(WORDS)]
    return [f"a {a} and a {b}", f"{b} next to {a} number {index}"]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def sample_files(index: int, modality: str, feature_dim: int) -> dict[str, bytes]:
    meta = {"captions": captions_for(index), "labels": {"group": index % 3}, "id": f"s{index}"}
    files = {"json": json.dumps(meta).encode()}
    if modality == "features":
        buf = io.BytesIO()
        np.save(buf, np.full(feature_dim, index, dtype=np.float32))
        files["feat.npy"] = buf.getvalue()
    else:
        files["png"] = image_bytes(index)
    return files


def write_split(
    root: Path,
    split: str,
    num_samples: int,
    shard_size: int,
    *,
    modality: str = "image",
    feature_dim: int = 8,
    overrides: dict[int, dict[str, bytes]] | None = None,
    manifest: bool = True,
) -> Path:
    """``num_samples`` samples with ids s0, s1, ... in shards of ``shard_size``.

    ``overrides[i]`` replaces sample i's files (to plant faults)."""
    split_dir = root / split
    split_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for first in range(0, num_samples, shard_size):
        name = f"shard-{first // shard_size:06d}.tar"
        with tarfile.open(split_dir / name, "w") as tar:
            for i in range(first, min(first + shard_size, num_samples)):
                files = (overrides or {}).get(i) or sample_files(i, modality, feature_dim)
                for ext, data in files.items():
                    add_member(tar, f"{i:08d}.{ext}", data)
        count = min(shard_size, num_samples - first)
        shards.append(ShardInfo(name, count, sha256_file(split_dir / name), (split_dir / name).stat().st_size))
    if manifest:
        write_manifest(
            Manifest(
                split=split,
                modality=modality,
                shards=shards,
                image_format=["png"] if modality == "image" else [],
                feature_dim=feature_dim if modality == "features" else None,
                builder="tests",
            ),
            split_dir,
        )
    return split_dir


def train_val_shards(root: Path, num_train: int = 48, num_val: int = 12, shard_size: int = 6) -> Path:
    """The tiny training runs' dataset: ``train`` and ``val`` splits in shards of ``shard_size``."""
    write_split(root, "train", num_train, shard_size=shard_size)
    write_split(root, "val", num_val, shard_size=shard_size)
    return root
