"""Reading WebDataset tars: samples grouped by key, with damage turned into counted placeholders.

A shard is read as a stream of samples (dicts of ``extension -> bytes`` plus ``__key__``).
When a tar is damaged, the reader does not raise: every sample the plan expected but could
not get becomes a ``Missing(reason)`` placeholder, so positions in the stream (and with
them batch windows and resume points) stay exactly where the plan put them.
"""

from __future__ import annotations

import dataclasses
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from webdataset.tariterators import base_plus_ext

# The payload extensions a sample may carry; a tar member group with none of them is not a
# sample (img2dataset, for one, also writes per-shard parquet/stats files beside the tars).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
FEATURE_EXTENSIONS = ("feat.npy",)
PAYLOAD_EXTENSIONS = IMAGE_EXTENSIONS + FEATURE_EXTENSIONS


@dataclasses.dataclass(frozen=True)
class Missing:
    """Stands in for a sample that could not be read (e.g. the tar is truncated)."""

    reason: str
    key: str = ""


def _is_sample(group: dict) -> bool:
    return any(ext in group for ext in PAYLOAD_EXTENSIONS)


def iter_tar_samples(path: str | Path) -> Iterator[dict]:
    """Yield the samples of one tar in file order.

    A damaged tar (truncated, garbage) simply ends early instead of raising: the last,
    possibly partial, group is dropped and the caller accounts for the samples that never
    came by comparing with the count the manifest promised.
    """
    current: dict | None = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                name = os.path.basename(member.name)
                prefix, suffix = base_plus_ext(member.name)
                if prefix is None or name.startswith(("__", ".")):
                    continue
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                if current is not None and current["__key__"] != prefix:
                    if _is_sample(current):
                        yield current
                    current = None
                if current is None:
                    current = {"__key__": prefix}
                current[suffix.lower()] = data
    except (OSError, tarfile.TarError, EOFError):
        return
    if current is not None and _is_sample(current):
        yield current


def read_piece(path: str | Path, start: int, stop: int) -> Iterator[dict | Missing]:
    """Samples ``[start, stop)`` of one shard, padded with ``Missing`` if the tar ends early."""
    num_read = 0
    if stop > start:
        for index, sample in enumerate(iter_tar_samples(path)):
            if index >= start:
                yield sample
                num_read += 1
                if index == stop - 1:
                    break
    reason = "truncated_shard" if os.path.exists(path) else "missing_shard"
    for _ in range(stop - start - num_read):
        yield Missing(reason)


def count_tar_samples(path: str | Path) -> int:
    """Number of samples in a tar, from its headers (tarfile seeks over the contents)."""
    count, key, extensions = 0, None, set()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                prefix, suffix = base_plus_ext(member.name)
                name = os.path.basename(member.name)
                if not member.isreg() or prefix is None or name.startswith(("__", ".")):
                    continue
                if prefix != key:
                    count += bool(extensions & set(PAYLOAD_EXTENSIONS))
                    key, extensions = prefix, set()
                extensions.add(suffix.lower())
    except (OSError, tarfile.TarError, EOFError):
        return count  # damaged: count what is readable (the partial last group is dropped)
    return count + bool(extensions & set(PAYLOAD_EXTENSIONS))


def read_members(path: str | Path, extensions: tuple[str, ...]) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) for members with the given extensions only; other members'
    contents are skipped without reading them (cheap way to collect all captions)."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                prefix, suffix = base_plus_ext(member.name)
                if prefix is None or suffix.lower() not in extensions:
                    continue
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    return
                yield prefix, suffix.lower(), data
    except (OSError, tarfile.TarError, EOFError):
        return  # damaged or missing: the loader counts its samples when it meets them
