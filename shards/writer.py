"""Deterministic WebDataset tar shards and their manifests.

The same samples in the same order always give the same bytes: every tar header has
mtime 0, uid/gid 0, empty owner names and mode 0o444, and members are written in
input order. A build can then be checked by sha256 alone, and rebuilding with more
worker processes changes nothing.

Each shard is written to ``<name>.tmp`` and renamed when complete; a split's manifest
is deleted when its rebuild starts and written last, so a reader that trusts the
manifest never sees a half-written split.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

from cmr.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, sha256_file, write_manifest
from shards.images import Payload

SHARD_PATTERN = re.compile(r"^shard-(\d{6})\.tar$")
KEY_DIGITS = 8  # sample keys are "00000000", "00000001", ...: no dots, sort in order


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def tar_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def encode_sample_json(captions: list[str], labels: Any, source_id: Any) -> bytes:
    record = {"captions": captions, "labels": labels, "id": source_id}
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


class SplitWriter:
    """Writes one split's samples into ``shard-NNNNNN.tar`` files of ``shard_size`` samples."""

    def __init__(self, split_dir: Path, shard_size: int):
        self.split_dir = split_dir
        self.shard_size = shard_size
        self.shards: list[ShardInfo] = []
        self.num_samples = 0
        self.captions_counts: list[int] = []
        self.image_formats: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0
        split_dir.mkdir(parents=True, exist_ok=True)
        # The old manifest describes shards we are about to overwrite: drop it first.
        (split_dir / MANIFEST_NAME).unlink(missing_ok=True)

    def _tmp_path(self) -> Path:
        return self.split_dir / (shard_name(len(self.shards)) + ".tmp")

    def add(self, sample_json: bytes, payload: Payload, num_captions: int) -> None:
        if self._tar is None:
            self._tar = tarfile.open(self._tmp_path(), "w", format=tarfile.USTAR_FORMAT)
        key = sample_key(self.num_samples)
        for name, data in ((f"{key}.json", sample_json), (f"{key}.{payload.ext}", payload.data)):
            self._tar.addfile(tar_member(name, len(data)), io.BytesIO(data))
        self.num_samples += 1
        self._in_shard += 1
        self.captions_counts.append(num_captions)
        if payload.ext != "feat.npy":
            self.image_formats.add(payload.ext)
        if self._in_shard == self.shard_size:
            self._close_shard()

    def _close_shard(self) -> None:
        self._tar.close()
        tmp = self._tmp_path()
        final = tmp.with_name(shard_name(len(self.shards)))
        tmp.replace(final)
        self.shards.append(
            ShardInfo(final.name, self._in_shard, sha256_file(final), final.stat().st_size)
        )
        self._tar = None
        self._in_shard = 0

    def finish(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._close_shard()
        self._remove_stale_files()
        return self.shards

    def _remove_stale_files(self) -> None:
        """Shards beyond the new count (from an older, bigger build) and leftover .tmp files."""
        for path in self.split_dir.iterdir():
            match = SHARD_PATTERN.match(path.name)
            if (match and int(match.group(1)) >= len(self.shards)) or path.name.endswith(".tmp"):
                path.unlink()

    def captions_stats(self) -> dict[str, float]:
        counts = self.captions_counts
        if not counts:
            return {}
        return {"min": min(counts), "mean": round(sum(counts) / len(counts), 4), "max": max(counts)}


class DatasetWriter:
    """Routes samples to one ``SplitWriter`` per split under ``out_dir``."""

    def __init__(self, out_dir: Path, shard_size: int):
        self.out_dir = Path(out_dir)
        self.shard_size = shard_size
        self.splits: dict[str, SplitWriter] = {}

    def add(self, split: str, sample_json: bytes, payload: Payload, num_captions: int) -> None:
        writer = self.splits.get(split)
        if writer is None:
            writer = self.splits[split] = SplitWriter(self.out_dir / split, self.shard_size)
        writer.add(sample_json, payload, num_captions)

    def finish(
        self,
        *,
        modality: str,
        builder: str,
        builder_version: str,
        source: dict[str, Any],
        skipped: dict[str, int],
        feature_dim: int | None = None,
    ) -> dict[str, Manifest]:
        manifests = {}
        for split in sorted(self.splits):
            writer = self.splits[split]
            manifest = Manifest(
                split=split,
                modality=modality,
                shards=writer.finish(),
                image_format=sorted(writer.image_formats),
                feature_dim=feature_dim,
                captions_per_sample=writer.captions_stats(),
                skipped=dict(skipped),
                builder=builder,
                builder_version=builder_version,
                source=source,
            )
            write_manifest(manifest, writer.split_dir)  # last: the split is complete
            manifests[split] = manifest
        return manifests
