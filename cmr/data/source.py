"""Finding the shards of a split: our manifests, or plain tars such as img2dataset writes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from cmr.data.manifest import MANIFEST_NAME, Manifest, read_manifest
from cmr.data.tario import FEATURE_EXTENSIONS, count_tar_samples, iter_tar_samples


class DataError(RuntimeError):
    """A problem with the data a user pointed us at; the message says what and how to fix it."""


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """The shards of one split, with the sample count of each (needed to plan an epoch)."""

    split_dir: Path
    paths: tuple[Path, ...]
    sizes: tuple[int, ...]
    modality: str  # "image" | "features"
    feature_dim: int | None = None
    manifest: Manifest | None = None

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    @property
    def num_shards(self) -> int:
        return len(self.paths)


def _split_dir(root: Path, split: str) -> Path:
    # "." (or "") means the tars lie directly in root, as img2dataset writes them.
    return root if split in ("", ".") else root / split


def _available_splits(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.tar")))


def _modality_of_first_sample(path: Path) -> str:
    for sample in iter_tar_samples(path):
        return "features" if any(e in sample for e in FEATURE_EXTENSIONS) else "image"
    return "image"


def open_split(root: str | Path, split: str) -> ShardSet:
    """The shards of ``root/split``: from its manifest if there is one, else by scanning tars."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"shard directory not found: {root} (build one with `python -m shards build ...`)")
    split_dir = _split_dir(root, split)
    if (split_dir / MANIFEST_NAME).is_file():
        try:
            manifest = read_manifest(split_dir)
        except ValueError as err:
            raise DataError(str(err)) from None
        if not manifest.shards:
            raise DataError(f"{split_dir / MANIFEST_NAME} lists no shards")
        return ShardSet(
            split_dir=split_dir,
            paths=tuple(split_dir / s.name for s in manifest.shards),
            sizes=tuple(s.num_samples for s in manifest.shards),
            modality=manifest.modality,
            feature_dim=manifest.feature_dim,
            manifest=manifest,
        )
    tars = sorted(split_dir.glob("*.tar")) if split_dir.is_dir() else []
    if not tars:
        found = ", ".join(_available_splits(root)) or "none"
        raise DataError(
            f"no shards for split {split!r} in {root}: expected {split_dir}/{MANIFEST_NAME} or "
            f"{split_dir}/*.tar (splits with shards: {found}; use '.' for tars directly in {root})"
        )
    return ShardSet(
        split_dir=split_dir,
        paths=tuple(tars),
        sizes=tuple(_cached_counts(split_dir, tars)),
        modality=_modality_of_first_sample(tars[0]),
    )


def _cached_counts(split_dir: Path, tars: list[Path]) -> list[int]:
    """Sample counts of manifest-less tars; remembered in a side file when the dir is writable."""
    cache = split_dir / ".cmr_counts.json"
    stamp = {t.name: [t.stat().st_size, t.stat().st_mtime_ns] for t in tars}
    try:
        saved = json.loads(cache.read_text())
        if saved.get("stamp") == stamp:
            return saved["counts"]
    except (OSError, ValueError, KeyError):
        pass
    counts = [count_tar_samples(t) for t in tars]
    try:
        cache.write_text(json.dumps({"stamp": stamp, "counts": counts}))
    except OSError:
        pass  # read-only dataset: count again next time
    return counts
