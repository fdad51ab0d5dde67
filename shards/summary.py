"""``python -m shards inspect DIR``: what a built dataset holds, from its manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmr.data.manifest import MANIFEST_NAME, Manifest, read_manifest
from shards.report import ShardsError


def find_splits(dataset_dir: str | Path) -> dict[str, Path]:
    """Split name -> split directory, for every subdirectory that has a manifest."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise ShardsError(f"dataset directory not found: {dataset_dir}")
    return {
        path.name: path
        for path in sorted(dataset_dir.iterdir())
        if path.is_dir() and (path / MANIFEST_NAME).is_file()
    }


def _split_summary(manifest: Manifest, split_dir: Path) -> dict[str, Any]:
    # Bytes on disk, not the manifest's claim: inspect should show what is really there.
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


def inspect_dataset(dataset_dir: str | Path) -> dict[str, Any]:
    """``{"dir", "splits": {split: {samples, shards, captions_per_sample, modality,
    image_format, feature_dim, skipped, total_bytes, builder}}, "samples", "total_bytes"}``.

    ``skipped`` counts are those of the build that wrote the split (every split of one
    build carries the same counts).
    """
    splits = find_splits(dataset_dir)
    if not splits:
        raise ShardsError(f"no <split>/{MANIFEST_NAME} under {dataset_dir}: not a built dataset")
    summaries = {}
    for name, split_dir in splits.items():
        try:
            manifest = read_manifest(split_dir)
        except ValueError as err:
            raise ShardsError(str(err)) from None
        summaries[name] = _split_summary(manifest, split_dir)
    return {
        "dir": str(dataset_dir),
        "splits": summaries,
        "samples": sum(s["samples"] for s in summaries.values()),
        "total_bytes": sum(s["total_bytes"] for s in summaries.values()),
    }
