"""The shard manifest: what a split directory holds, written by ``shards`` and read by the loader.

Layout of a dataset directory::

    DIR/<split>/shard-000000.tar ...   WebDataset tars
    DIR/<split>/manifest.json          this file's schema (``Manifest``)

Each sample in a tar is ``<key>.json`` (``{"captions": [...], "labels": {...}, "id": ...}``)
plus either ``<key>.jpg`` / ``<key>.png`` (encoded image bytes) or ``<key>.feat.npy``
(one precomputed feature row). Keys contain no dots (WebDataset splits keys at the first
dot of the file name).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclasses.dataclass
class ShardInfo:
    name: str  # file name relative to the split directory
    num_samples: int
    sha256: str = ""
    num_bytes: int = 0


@dataclasses.dataclass
class Manifest:
    split: str
    modality: str  # "image" | "features"
    shards: list[ShardInfo]
    image_format: list[str] = dataclasses.field(default_factory=list)  # e.g. ["png"], ["jpg"]
    feature_dim: int | None = None
    captions_per_sample: dict[str, float] = dataclasses.field(default_factory=dict)
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    builder: str = ""
    builder_version: str = ""
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["num_samples"] = self.num_samples
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Manifest":
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        kwargs["shards"] = [ShardInfo(**s) for s in data.get("shards", [])]
        manifest = cls(**kwargs)
        declared = data.get("num_samples")
        if declared is not None and declared != manifest.num_samples:
            raise ValueError(
                f"manifest says num_samples={declared} but its shards add up to {manifest.num_samples}"
            )
        return manifest


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(manifest: Manifest, split_dir: str | Path) -> Path:
    """Write ``manifest.json`` atomically (a reader never sees a half-written file)."""
    path = Path(split_dir) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_manifest(split_dir: str | Path) -> Manifest:
    path = Path(split_dir) / MANIFEST_NAME
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{path}: unreadable manifest ({err})") from None
