"""``python -m shards inspect DIR``: what a built dataset holds, from its manifests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cmr.data.manifest import MANIFEST_NAME, Manifest, read_manifest
from cmr.data.remote import LOCAL, Location, Opener, RemoteError, is_remote, join, redact
from shards.report import ShardsError

# A web server cannot list a folder: remote datasets are probed for these split names.
REMOTE_SPLITS = ("train", "val", "test", "restval")


def find_splits(dataset_dir: Location, opener: Opener = LOCAL) -> dict[str, Location]:
    """Split name -> split directory, for every subdirectory that has a manifest (remote:
    every one of ``REMOTE_SPLITS`` that has one)."""
    if is_remote(dataset_dir):
        found = {}
        for name in REMOTE_SPLITS:
            if load_manifest(join(dataset_dir, name), opener, missing_ok=True) is not None:
                found[name] = join(dataset_dir, name)
        return found
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise ShardsError(f"dataset directory not found: {dataset_dir}")
    return {
        path.name: path
        for path in sorted(dataset_dir.iterdir())
        if path.is_dir() and (path / MANIFEST_NAME).is_file()
    }


def load_manifest(split_dir: Location, opener: Opener = LOCAL, missing_ok: bool = False) -> Manifest | None:
    """The manifest of a local or remote split directory (``ShardsError`` if unreadable)."""
    if not is_remote(split_dir):
        try:
            return read_manifest(split_dir)
        except ValueError as err:
            raise ShardsError(str(err)) from None
    location = join(split_dir, MANIFEST_NAME)
    try:
        return Manifest.from_json(json.loads(opener.read_bytes(location)))
    except RemoteError as err:
        if missing_ok and err.reason == "missing_shard":
            return None
        raise ShardsError(str(err)) from None
    except (ValueError, TypeError, KeyError) as err:
        raise ShardsError(f"{redact(location)}: unreadable manifest ({err})") from None


def _split_summary(manifest: Manifest, split_dir: Location) -> dict[str, Any]:
    # Bytes on disk, not the manifest's claim: inspect should show what is really there
    # (a remote split: the manifest's claim; validate checks it).
    if is_remote(split_dir):
        total_bytes = sum(s.num_bytes for s in manifest.shards)
    else:
        total_bytes = sum(
            (split_dir / s.name).stat().st_size
            for s in manifest.shards
            if (split_dir / s.name).is_file()
        )
    return {
        "samples": manifest.num_samples,
        "shards": len(manifest.shards),
        "captions_per_sample": manifest.captions_per_sample,
        "modality": manifest.modality,
        "image_format": manifest.image_format,
        "feature_dim": manifest.feature_dim,
        "skipped": manifest.skipped,
        "total_bytes": total_bytes,
        "builder": manifest.builder,
    }


def inspect_dataset(dataset_dir: Location, opener: Opener = LOCAL) -> dict[str, Any]:
    """``{"dir", "splits": {split: {samples, shards, captions_per_sample, modality,
    image_format, feature_dim, skipped, total_bytes, builder}}, "samples", "total_bytes"}``.

    ``skipped`` counts are those of the build that wrote the split (every split of one
    build carries the same counts).
    """
    splits = find_splits(dataset_dir, opener)
    if not splits:
        probed = f" (looked for {', '.join(REMOTE_SPLITS)})" if is_remote(dataset_dir) else ""
        raise ShardsError(f"no <split>/{MANIFEST_NAME} under {redact(dataset_dir)}{probed}: not a built dataset")
    summaries = {name: _split_summary(load_manifest(split_dir, opener), split_dir)
                 for name, split_dir in splits.items()}
    return {
        "dir": redact(dataset_dir),
        "splits": summaries,
        "samples": sum(s["samples"] for s in summaries.values()),
        "total_bytes": sum(s["total_bytes"] for s in summaries.values()),
    }
