"""``python -m shards validate DIR [--decode]``: re-read every shard against its manifest.

Catches what goes wrong between a build and a training run: a shard truncated by a
full disk or an interrupted copy, a flipped byte, a hand-edited tar, a stale shard
left from an older build. Every problem is one line naming the split and shard.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from cmr.data.manifest import Manifest, read_manifest, sha256_file
from shards.images import own_pixel_limit
from shards.summary import find_splits
from shards.writer import SHARD_PATTERN

PAYLOAD_EXTS = {"image": ("jpg", "png"), "features": ("feat.npy",)}


def validate_dataset(dataset_dir: str | Path, decode: bool = False) -> list[str]:
    """Problems found, one line each; an empty list means the dataset is intact."""
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


def _read_samples(path: Path, keep_payload: bool) -> list[tuple[str, dict[str, bytes | None]]]:
    """[(key, {ext: bytes})] in tar order; payload bytes only kept when asked for."""
    samples: dict[str, dict[str, bytes | None]] = {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            files = samples.setdefault(key, {})
            if not info.isfile():
                files[ext or "<no extension>"] = None
                continue
            data = tar.extractfile(info).read()  # reads through: a truncated member raises
            files[ext or "<no extension>"] = data if keep_payload or ext == "json" else None
    return list(samples.items())


def _check_shard(
    path: Path, where: str, expected: int, manifest: Manifest, decode: bool, seen_keys: set[str]
) -> list[str]:
    try:
        samples = _read_samples(path, keep_payload=decode)
    except (tarfile.TarError, OSError, EOFError) as err:
        return [f"{where}: unreadable tar ({err})"]
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
