"""The part every builder shares: config, caption and split rules, the worker pool, the write loop.

A builder (jsonl, karpathy, emoji, features) turns its source into a list of
``SampleSpec`` (text already checked, split decided), then hands it to
``write_dataset`` together with an iterator of payloads in the same order. Images are
loaded and checked by ``load_images`` in a process pool (``imap`` keeps the order, so
the output does not depend on the number of workers); the main process alone writes
the shards.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from cmr.config import ConfigError, from_dict
from shards.images import DEFAULT_MAX_PIXELS, Payload, Skip, load_image
from shards.report import BuildReport, ShardsError, SkipReport
from shards.writer import DatasetWriter, encode_sample_json

BUILDER_VERSION = "1"
SPLIT_ALIASES = {"dev": "val", "valid": "val", "validation": "val"}
HASH_SPLITS = ("train", "val", "test")
_SPLIT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")  # becomes a directory name


def default_num_workers() -> int:
    return min(4, os.cpu_count() or 1)


@dataclasses.dataclass
class BuildConfig:
    """Options shared by all builders (the CLI flags of ``python -m shards build``)."""

    shard_size: int = 100  # samples per tar
    workers: int = dataclasses.field(default_factory=default_num_workers)  # <= 1: no pool
    max_size: int | None = None  # longer image side above this is resized down
    max_pixels: int = DEFAULT_MAX_PIXELS  # images with more pixels are skipped
    split_fractions: tuple[float, float, float] | None = None  # train/val/test for unsplit samples
    feature_dtype: Literal["float32", "float16"] = "float32"  # features builder only
    progress: bool = True  # tqdm bar on stderr

    def validate(self) -> None:
        if self.shard_size < 1:
            raise ConfigError("shard_size", f"must be at least 1, got {self.shard_size}")
        if self.workers < 0:
            raise ConfigError("workers", f"must be 0 or more, got {self.workers}")
        if self.max_size is not None and self.max_size < 1:
            raise ConfigError("max_size", f"must be at least 1 pixel, got {self.max_size}")
        if self.max_pixels < 1:
            raise ConfigError("max_pixels", f"must be at least 1, got {self.max_pixels}")
        if self.split_fractions is not None:
            fractions = self.split_fractions
            if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
                raise ConfigError(
                    "split_fractions", f"need three fractions >= 0 that sum to 1, got {fractions}"
                )


def build_config(options: dict[str, Any]) -> BuildConfig:
    """``BuildConfig`` from keyword options; a bad one raises a one-line ``ConfigError``."""
    return from_dict(BuildConfig, options)


@dataclasses.dataclass
class SampleSpec:
    """One sample whose text is already checked; only its payload is still to load."""

    split: str
    captions: list[str]
    labels: Any
    source_id: Any
    where: str  # "line 12" or a path: what a skip report points the user to
    image: str | bytes | None = None  # image path, or encoded bytes (emoji from a tgz)
    row: int | None = None  # feature row (features builder)


# ---------------------------------------------------------------------------- text rules


def clean_captions(raw: Any, where: str, report: SkipReport) -> list[str] | None:
    """Captions as a list of stripped non-empty strings, or None (the sample is skipped)."""
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        report.skip("bad_field", f"{where}: captions must be a string or a list of strings")
        return None
    captions = [caption.strip() for caption in raw if caption.strip()]
    if not captions:
        report.skip("empty_caption", where)
        return None
    try:
        "".join(captions).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\udXXX" JSON escape
        report.skip("non_utf8_text", where)
        return None
    # Only counted for samples that stay; a skipped sample counts once, as empty_caption.
    for _ in range(len(raw) - len(captions)):
        report.skip("empty_caption_dropped", where)
    return captions


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone: same on every machine and Python run."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(key: str, fractions: tuple[float, float, float]) -> str:
    point = stable_fraction(key)
    bound = 0.0
    for split, fraction in zip(HASH_SPLITS, fractions, strict=True):
        bound += fraction
        if point < bound:
            return split
    return HASH_SPLITS[-1]  # float rounding at the very top


def resolve_split(
    raw: Any, hash_key: str, config: BuildConfig, where: str, report: SkipReport
) -> str | None:
    """The split directory for a sample: its own (aliases mapped), hashed, or ``train``."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        if config.split_fractions is not None:
            return hash_split(hash_key, config.split_fractions)
        return "train"
    if not isinstance(raw, str):
        report.skip("bad_field", f"{where}: split must be a string")
        return None
    name = raw.strip().lower()
    name = SPLIT_ALIASES.get(name, name)
    if not _SPLIT_NAME.match(name):
        report.skip("bad_field", f"{where}: split {raw!r} is not a usable directory name")
        return None
    return name


def read_jsonl(path: Path, report: SkipReport) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each good line. Read as bytes and decoded line by line,
    so one badly encoded line costs one sample, not the whole file."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ShardsError(f"cannot read captions file {path}: {err.strerror}") from None
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
        data = data[3:]
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            report.skip("non_utf8_text", f"line {line_no}")
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            report.skip("broken_json_line", f"line {line_no}")
            continue
        if not isinstance(record, dict):
            report.skip("broken_json_line", f"line {line_no}: not a JSON object")
            continue
        yield line_no, record


# ---------------------------------------------------------------------------- pool + writing


def load_images(specs: list[SampleSpec], config: BuildConfig) -> Iterator[Payload | Skip]:
    """Payloads for ``specs`` in order, loaded by ``config.workers`` processes."""
    load = functools.partial(load_image, max_pixels=config.max_pixels, max_size=config.max_size)
    sources = (spec.image for spec in specs)
    if config.workers <= 1 or len(specs) < 2:
        yield from map(load, sources)
        return
    # spawn, not fork: the caller may be a process with threads (torch, tqdm) that a
    # fork would copy in a broken state.
    context = multiprocessing.get_context("spawn")
    chunksize = max(1, min(64, len(specs) // (config.workers * 8)))
    with context.Pool(config.workers) as pool:
        yield from pool.imap(load, sources, chunksize=chunksize)


def write_dataset(
    specs: list[SampleSpec],
    payloads: Iterable[Payload | Skip],
    out_dir: Path,
    config: BuildConfig,
    report: SkipReport,
    *,
    builder: str,
    source: dict[str, Any],
    modality: str = "image",
    feature_dim: int | None = None,
) -> BuildReport:
    """Write every good sample; skips are counted in ``report``. Returns what was written."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ShardsError(f"output path exists and is not a directory: {out_dir}")
    writer = DatasetWriter(Path(out_dir), config.shard_size)
    progress = tqdm(
        total=len(specs), desc=builder, unit="sample", file=sys.stderr, disable=not config.progress
    )
    with progress:
        for spec, payload in zip(specs, payloads, strict=True):
            progress.update(1)
            if isinstance(payload, Skip):
                detail = f" ({payload.detail})" if payload.detail else ""
                report.skip(payload.reason, f"{spec.where}{detail}")
                continue
            sample_json = encode_sample_json(spec.captions, spec.labels, spec.source_id)
            writer.add(spec.split, sample_json, payload, len(spec.captions))
    manifests = writer.finish(
        modality=modality,
        builder=builder,
        builder_version=BUILDER_VERSION,
        source=source,
        skipped=report.as_dict(),
        feature_dim=feature_dim,
    )
    return BuildReport(
        out_dir=Path(out_dir),
        builder=builder,
        samples={split: m.num_samples for split, m in manifests.items()},
        shards={split: len(m.shards) for split, m in manifests.items()},
        skipped=report.as_dict(),
        examples={r: list(e) for r, e in report.examples.items()},
    )
