"""Finding the shards of a split: our manifests, or plain tars such as img2dataset writes,
on a local disk, behind http(s) or in an object store."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

from cmr.data.manifest import MANIFEST_NAME, Manifest, read_manifest
from cmr.data.remote import (LOCAL, Location, Opener, RemoteError, basename, expand, is_pattern, is_remote, is_url,
                             is_store_failure, join, local_path, redact, redact_text, sibling)
from cmr.data.tario import FEATURE_EXTENSIONS, TarMembers, count_tar_samples, iter_tar_samples


class DataError(RuntimeError):
    """A problem with the data a user pointed us at; the message says what and how to fix it."""


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """The shards of one split, with the sample count of each (needed to plan an epoch).

    ``split_dir`` and ``paths`` are local paths or URLs; ``opener`` reads them."""

    split_dir: Location
    paths: tuple[Location, ...]
    sizes: tuple[int, ...]
    modality: str  # "image" | "features"
    feature_dim: int | None = None
    manifest: Manifest | None = None
    opener: Opener = LOCAL

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    @property
    def num_shards(self) -> int:
        return len(self.paths)

    @property
    def names(self) -> tuple[str, ...]:
        """Shard file names: the first part of every sample key."""
        return tuple(basename(p) for p in self.paths)

    @property
    def is_remote(self) -> bool:
        return is_remote(self.split_dir)


ShardSpec = str | list[str] | dict[str, str | list[str]]


def describe(shards: ShardSpec, split: str) -> str:
    """Where a split's shards are, for a message (secrets redacted)."""
    if isinstance(shards, dict):
        spec = shards.get(split, "")
        return redact(spec) if isinstance(spec, str) else f"{len(spec)} shard URLs"
    if isinstance(shards, list):
        return f"{len(shards)} shard URLs"
    if is_pattern(shards):
        return redact(shards)
    return redact(_split_dir(shards, split))


def _split_dir(root: Location, split: str) -> Location:
    # "." (or "") means the tars lie directly in root, as img2dataset writes them.
    if split in ("", "."):
        return root if is_url(root) else Path(root)
    return join(root, split)


def _available_splits(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.tar")))


def _modality_of_first_sample(path: Location, opener: Opener) -> str:
    for sample in iter_tar_samples(path, opener):
        return "features" if any(e in sample for e in FEATURE_EXTENSIONS) else "image"
    return "image"


def open_split(shards: ShardSpec, split: str, opener: Opener = LOCAL,
               shard_sizes: list[int] | int | None = None) -> ShardSet:
    """The shards of one split of ``shards`` (``data.shards``): a dataset directory or URL
    prefix whose split folders hold a manifest (or plain tars); a brace pattern or list of
    shard locations; or a mapping of split names to either.

    Sample counts come from the manifest, else ``shard_sizes``, else img2dataset's
    ``*_stats.json`` beside each tar, else one counting pass (cached)."""
    if isinstance(shards, dict):
        if split not in shards:
            raise DataError(f"data.shards names the splits {', '.join(map(repr, shards))}; "
                            f"there is no {split!r} among them")
        spec = shards[split]
        if is_pattern(spec):
            return _open_pattern(spec, opener, shard_sizes)
        return _open_dir(spec, ".", opener, shard_sizes)
    if is_pattern(shards):
        return _open_pattern(shards, opener, shard_sizes)
    return _open_dir(shards, split, opener, shard_sizes)


def _open_dir(root: Location, split: str, opener: Opener, shard_sizes) -> ShardSet:
    if is_remote(root):
        return _open_remote_dir(root, split, opener, shard_sizes)
    root = local_path(root)
    if not root.is_dir():
        raise DataError(f"shard directory not found: {root} (build one with `python -m shards build ...`)")
    split_dir = _split_dir(root, split)
    if (split_dir / MANIFEST_NAME).is_file():
        try:
            manifest = read_manifest(split_dir)
        except ValueError as err:
            raise DataError(str(err)) from None
        return _from_manifest(manifest, split_dir, opener)
    tars = sorted(split_dir.glob("*.tar")) if split_dir.is_dir() else []
    if not tars:
        found = ", ".join(_available_splits(root)) or "none"
        raise DataError(
            f"no shards for split {split!r} in {root}: expected {split_dir}/{MANIFEST_NAME} or "
            f"{split_dir}/*.tar (splits with shards: {found}; use '.' for tars directly in {root})"
        )
    sizes = _given_sizes(shard_sizes, len(tars)) or _stats_sizes(tars, opener) or _cached_counts(split_dir, tars)
    return ShardSet(split_dir=split_dir, paths=tuple(tars), sizes=tuple(sizes),
                    modality=_modality_of_first_sample(tars[0], opener), opener=opener)


def _from_manifest(manifest: Manifest, split_dir: Location, opener: Opener) -> ShardSet:
    if not manifest.shards:
        raise DataError(f"{redact(join(split_dir, MANIFEST_NAME))} lists no shards")
    return ShardSet(
        split_dir=split_dir,
        paths=tuple(join(split_dir, s.name) for s in manifest.shards),
        sizes=tuple(s.num_samples for s in manifest.shards),
        modality=manifest.modality,
        feature_dim=manifest.feature_dim,
        manifest=manifest,
        opener=opener,
    )


def _read_remote_manifest(split_dir: Location, opener: Opener) -> Manifest | None:
    """The manifest in a remote split folder; None where there is none."""
    location = join(split_dir, MANIFEST_NAME)
    try:
        data = opener.read_bytes(location)
    except RemoteError as err:
        if err.reason == "missing_shard":
            return None
        raise DataError(f"cannot read {redact(location)}: {err}") from None
    try:
        return Manifest.from_json(json.loads(data))
    except (ValueError, TypeError, KeyError) as err:
        raise DataError(f"{redact(location)}: unreadable manifest ({err})") from None


def _open_remote_dir(root: str, split: str, opener: Opener, shard_sizes) -> ShardSet:
    split_dir = _split_dir(root, split)
    manifest = _read_remote_manifest(split_dir, opener)
    if manifest is not None:
        return _from_manifest(manifest, split_dir, opener)
    tars = _list_tars(split_dir)
    if not tars:
        raise DataError(
            f"no shards for split {split!r} at {redact(root)}: no {redact(join(split_dir, MANIFEST_NAME))}"
            + ("" if tars is None else " and no *.tar there")
            + " (name the shards with a brace pattern, e.g. data.shards=https://host/data/{000000..000099}.tar)"
        )
    return _open_locations(tars, split_dir, opener, shard_sizes)


def _list_tars(split_dir: str) -> list[str] | None:
    """The tars in a remote folder where the store can list (object stores), else None (http)."""
    if urlsplit(split_dir).scheme in ("http", "https", "pipe", ""):
        return None
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(split_dir)
        found = sorted(fs.glob(path.rstrip("/") + "/*.tar"))
    except Exception as err:
        if not isinstance(err, (ImportError, ValueError)) and not is_store_failure(err):
            raise
        raise DataError(f"cannot list {redact(split_dir)}: {redact_text(str(err), [split_dir])}") from None
    scheme = urlsplit(split_dir).scheme
    return [f"{scheme}://{p}" for p in found]


def _open_pattern(spec: str | list[str], opener: Opener, shard_sizes) -> ShardSet:
    try:
        locations = expand(spec)
    except Exception as err:  # noqa: BLE001 - braceexpand raises its own errors for bad patterns
        raise DataError(f"data.shards: bad shard pattern {redact(str(spec))} ({err})") from None
    if not locations:
        raise DataError(f"data.shards: the pattern {redact(str(spec))} names no shards")
    for location in locations:
        if str(location).startswith("pipe:") and not opener.allow_pipe:
            raise DataError(f"data.allow_pipe: {redact(location)} runs a shell command; "
                            "set data.allow_pipe: true to allow it")
    first = locations[0]
    split_dir = sibling(first, "") if is_url(first) else local_path(first).parent
    # A manifest beside the shards (ours, served as is) counts them without reading a tar.
    if not str(first).startswith("pipe:"):
        manifest = (_read_remote_manifest(split_dir, opener) if is_remote(first)
                    else _local_manifest(local_path(first).parent))
        if manifest is not None:
            sizes = {s.name: s.num_samples for s in manifest.shards}
            if all(basename(x) in sizes for x in locations) and shard_sizes is None:
                return ShardSet(split_dir=split_dir, paths=tuple(locations),
                                sizes=tuple(sizes[basename(x)] for x in locations), modality=manifest.modality,
                                feature_dim=manifest.feature_dim, manifest=manifest, opener=opener)
    if not is_url(first):
        locations = [local_path(x) for x in locations]
    return _open_locations(locations, split_dir, opener, shard_sizes)


def _local_manifest(split_dir: Path) -> Manifest | None:
    if not (split_dir / MANIFEST_NAME).is_file():
        return None
    try:
        return read_manifest(split_dir)
    except ValueError as err:
        raise DataError(str(err)) from None


def _open_locations(locations: list, split_dir: Location, opener: Opener, shard_sizes) -> ShardSet:
    sizes = (_given_sizes(shard_sizes, len(locations)) or _stats_sizes(locations, opener)
             or counted_sizes(locations, opener))
    return ShardSet(split_dir=split_dir, paths=tuple(locations), sizes=tuple(sizes),
                    modality=_modality_of_first_sample(locations[0], opener), opener=opener)


def _given_sizes(shard_sizes: list[int] | int | None, num_shards: int) -> list[int] | None:
    if shard_sizes is None:
        return None
    if isinstance(shard_sizes, int):
        return [shard_sizes] * num_shards
    if len(shard_sizes) != num_shards:
        raise DataError(f"data.shard_sizes lists {len(shard_sizes)} counts for {num_shards} shards")
    return list(shard_sizes)


def _stats_sizes(locations: list, opener: Opener) -> list[int] | None:
    """Counts from img2dataset's ``<shard>_stats.json`` (``successes``) beside every tar."""
    sizes = []
    for location in locations:
        name = basename(location)
        if not name.endswith(".tar"):
            return None
        stats = sibling(location, name[: -len(".tar")] + "_stats.json")
        try:
            if is_remote(stats):
                data = opener.read_bytes(stats)
            elif Path(stats).is_file():
                data = Path(stats).read_bytes()
            else:
                return None
            sizes.append(int(json.loads(data)["successes"]))
        except RemoteError as err:
            if err.reason == "missing_shard":
                return None
            raise DataError(f"cannot read {redact(stats)}: {err}") from None
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return sizes


def counted_sizes(locations: list, opener: Opener, progress: bool = True) -> list[int]:
    """Sample counts by reading every tar's headers once; remote counts are cached locally,
    keyed by location, size and ETag/mtime, so a changed shard is counted again."""
    if not any(is_remote(x) for x in locations):
        return [count_tar_samples(x, opener) for x in locations]
    from tqdm import tqdm

    cache = count_cache_dir()
    counts = []
    for location in tqdm(locations, desc="counting samples", unit="shard", disable=not progress, leave=False):
        stamp = opener.stamp(location)
        entry = cache / (hashlib.sha256(f"{_without_query(location)}\n{stamp}".encode()).hexdigest() + ".json")
        if stamp:
            try:
                counts.append(int(json.loads(entry.read_text())["count"]))
                continue
            except (OSError, ValueError, KeyError):
                pass
        members = TarMembers(location, opener, read=lambda ext: False)
        count = count_tar_samples(location, opener, members=members)
        if members.failure not in (None, "truncated_shard"):
            raise DataError(f"cannot count the samples of {redact(location)}: {members.message}")
        counts.append(count)
        if stamp and members.failure is None:
            try:
                cache.mkdir(parents=True, exist_ok=True)
                tmp = entry.with_suffix(".tmp")
                tmp.write_text(json.dumps({"location": redact(location), "stamp": stamp, "count": count}))
                os.replace(tmp, entry)
            except OSError:
                pass  # read-only home: count again next time
    return counts


def count_cache_dir() -> Path:
    root = os.environ.get("CMR_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "cmr")
    return Path(root).expanduser() / "shard-counts"


def _without_query(location: Location) -> str:
    text = str(location)
    return text.split("?", 1)[0] if is_url(text) else text


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
