"""``python -m shards validate DIR [--decode]``: re-read every shard against its manifest.

Catches what goes wrong between a build and a training run: a shard truncated by a
full disk or an interrupted copy, a flipped byte, a hand-edited tar, a stale shard
left from an older build. Every problem is one line naming the split and shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from cmr.data.manifest import Manifest, read_manifest, sha256_file
from shards.images import own_pixel_limit
from cmr.data.remote import LOCAL, Location, Opener, RemoteError, close_quietly, is_remote, join, redact
from shards.report import ShardsError
from shards.summary import REMOTE_SPLITS, find_splits, load_manifest
from shards.writer import SHARD_PATTERN

PAYLOAD_EXTS = {"image": ("jpg", "png"), "features": ("feat.npy",)}


def validate_dataset(dataset_dir: Location, decode: bool = False, opener: Opener = LOCAL) -> list[str]:
    """Problems found, one line each; an empty list means the dataset is intact. A remote
    dataset (URL) is read through ``opener``: every shard streamed once, hashed as it comes."""
    if is_remote(dataset_dir):
        return _validate_remote(dataset_dir, decode, opener)
    dataset_dir = Path(dataset_dir)
    splits = find_splits(dataset_dir)
    problems = []
    for path in sorted(dataset_dir.iterdir()):
        if path.is_dir() and path.name not in splits and any(path.glob("shard-*.tar")):
            problems.append(f"{path.name}: shard files but no manifest.json (interrupted build?)")
    if not splits and not problems:
        problems.append(f"{dataset_dir}: no <split>/manifest.json found: not a built dataset")
    for name, split_dir in splits.items():
        try:
            manifest = read_manifest(split_dir)
        except ValueError as err:
            problems.append(f"{name}: {err}")
            continue
        problems.extend(validate_split(manifest, split_dir, decode))
    return problems


def validate_split(manifest: Manifest, split_dir: Path, decode: bool) -> list[str]:
    split = split_dir.name
    listed = {shard.name for shard in manifest.shards}
    problems = [
        f"{split}/{path.name}: shard file not listed in the manifest (stale?)"
        for path in sorted(split_dir.iterdir())
        if SHARD_PATTERN.match(path.name) and path.name not in listed
    ]
    if manifest.modality not in PAYLOAD_EXTS:
        return problems + [f"{split}: unknown modality {manifest.modality!r} in the manifest"]
    seen_keys: set[str] = set()
    for shard in manifest.shards:
        path, where = split_dir / shard.name, f"{split}/{shard.name}"
        if not path.is_file():
            problems.append(f"{where}: missing")
            continue
        num_bytes = path.stat().st_size
        if num_bytes != shard.num_bytes:
            problems.append(f"{where}: {num_bytes} bytes, manifest says {shard.num_bytes}")
        if sha256_file(path) != shard.sha256:
            problems.append(f"{where}: sha256 does not match the manifest (file changed)")
        problems.extend(_check_shard(path, where, shard.num_samples, manifest, decode, seen_keys))
    return problems


def _validate_remote(dataset_dir: str, decode: bool, opener: Opener) -> list[str]:
    splits = find_splits(dataset_dir, opener)
    if not splits:
        return [f"{redact(dataset_dir)}: no <split>/manifest.json found (looked for {', '.join(REMOTE_SPLITS)})"]
    problems: list[str] = []
    for name, split_dir in splits.items():
        try:
            manifest = load_manifest(split_dir, opener)
        except ShardsError as err:
            problems.append(f"{name}: {err}")
            continue
        if manifest.modality not in PAYLOAD_EXTS:
            problems.append(f"{name}: unknown modality {manifest.modality!r} in the manifest")
            continue
        seen_keys: set[str] = set()
        for shard in manifest.shards:
            where = f"{name}/{shard.name}"
            try:
                samples, num_bytes, sha = opener.retry(
                    lambda: _read_remote_samples(opener, join(split_dir, shard.name), decode), split_dir)
            except RemoteError as err:
                problems.append(f"{where}: {'missing' if err.reason == 'missing_shard' else 'unreadable'} ({err})")
                continue
            except (tarfile.TarError, EOFError) as err:
                problems.append(f"{where}: unreadable tar ({err})")
                continue
            if num_bytes != shard.num_bytes:
                problems.append(f"{where}: {num_bytes} bytes, manifest says {shard.num_bytes}")
            if sha != shard.sha256:
                problems.append(f"{where}: sha256 does not match the manifest (file changed)")
            problems.extend(_check_samples(samples, where, shard.num_samples, manifest, decode, seen_keys))
    return problems


class _Hashing(io.RawIOBase):
    """A stream that hashes and counts what passes through it."""

    def __init__(self, stream):
        self.stream, self.sha, self.num_bytes = stream, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.sha.update(data)
        self.num_bytes += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _read_remote_samples(opener: Opener, location, keep_payload: bool):
    stream = opener.open(location)
    try:
        hashing = _Hashing(stream)
        with tarfile.open(fileobj=hashing, mode="r|") as tar:
            samples = _samples_of(tar, keep_payload)
        while hashing.read(1 << 20):  # the tar's end padding counts in size and hash
            pass
        return samples, hashing.num_bytes, hashing.sha.hexdigest()
    finally:
        close_quietly(stream)


def _read_samples(path: Path, keep_payload: bool) -> list[tuple[str, dict[str, bytes | None]]]:
    """[(key, {ext: bytes})] in tar order; payload bytes only kept when asked for."""
    with tarfile.open(path, "r:") as tar:
        return _samples_of(tar, keep_payload)


def _samples_of(tar: tarfile.TarFile, keep_payload: bool) -> list[tuple[str, dict[str, bytes | None]]]:
    samples: dict[str, dict[str, bytes | None]] = {}
    for info in tar:
        key, _, ext = info.name.partition(".")
        files = samples.setdefault(key, {})
        if not info.isfile():
            files[ext or "<no extension>"] = None
            continue
        data = tar.extractfile(info).read()
        if len(data) != info.size:  # a stream that ends inside a member
            raise tarfile.ReadError("unexpected end of data")
        files[ext or "<no extension>"] = data if keep_payload or ext == "json" else None
    return list(samples.items())


def _check_shard(
    path: Path, where: str, expected: int, manifest: Manifest, decode: bool, seen_keys: set[str]
) -> list[str]:
    try:
        samples = _read_samples(path, keep_payload=decode)
    except (tarfile.TarError, OSError, EOFError) as err:
        return [f"{where}: unreadable tar ({err})"]
    return _check_samples(samples, where, expected, manifest, decode, seen_keys)


def _check_samples(samples, where: str, expected: int, manifest: Manifest, decode: bool,
                   seen_keys: set[str]) -> list[str]:
    problems = []
    if len(samples) != expected:
        problems.append(f"{where}: {len(samples)} samples, manifest says {expected}")
    for key, files in samples:
        if key in seen_keys:
            problems.append(f"{where}: sample {key}: key used twice in the split")
        seen_keys.add(key)
        for problem in _check_sample(files, manifest, decode):
            problems.append(f"{where}: sample {key}: {problem}")
    return problems


def _check_sample(files: dict[str, bytes | None], manifest: Manifest, decode: bool) -> list[str]:
    problems = []
    allowed = PAYLOAD_EXTS[manifest.modality]
    extra = sorted(set(files) - {"json", *allowed})
    if extra:
        problems.append(f"unexpected files {extra}")
    payloads = [ext for ext in files if ext in allowed]
    if len(payloads) != 1:
        problems.append(f"expected exactly one of {list(allowed)}, found {payloads or 'none'}")
    if "json" not in files:
        problems.append("no .json")
    else:
        problems.extend(_check_json(files["json"]))
    if decode and len(payloads) == 1 and files[payloads[0]] is not None:
        problem = _decode_payload(payloads[0], files[payloads[0]], manifest.feature_dim)
        if problem:
            problems.append(problem)
    return problems


def _check_json(data: bytes | None) -> list[str]:
    try:
        record = json.loads(data.decode("utf-8"))
    except (AttributeError, UnicodeDecodeError, json.JSONDecodeError):
        return ["json is not valid UTF-8 JSON"]
    captions = record.get("captions") if isinstance(record, dict) else None
    if not isinstance(captions, list) or not captions:
        return ["json has no non-empty 'captions' list"]
    if not all(isinstance(c, str) and c.strip() for c in captions):
        return ["json 'captions' holds an empty or non-string caption"]
    return []


def _decode_payload(ext: str, data: bytes, feature_dim: int | None) -> str | None:
    if ext == "feat.npy":
        try:
            row = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            return f"feature does not load ({err})"
        if row.ndim != 1 or (feature_dim is not None and row.shape[0] != feature_dim):
            return f"feature shape {row.shape}, manifest says ({feature_dim},)"
        if not np.isfinite(row).all():
            return "feature has NaN or Inf"
        return None
    try:
        with own_pixel_limit(), Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as err:  # noqa: BLE001 - any decoder failure means a bad image
        return f"{ext} does not decode ({type(err).__name__})"
    return None
