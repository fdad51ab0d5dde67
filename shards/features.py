"""Shards of precomputed image features (e.g. the ResNet-152 vectors VSE++ trains on).

Input: ``features.npy`` with one row per image, and a JSONL captions file whose line
``i`` describes row ``i`` (same fields as the jsonl builder minus ``image``; a ``row``
field overrides the index). Each sample stores ``<key>.feat.npy``: ``np.save`` of its
1-D row. Rows with NaN or Inf are skipped (``bad_feature``): one such row would turn
every loss it touches into NaN.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cmr.data.manifest import sha256_file
from shards.images import Payload, Skip
from shards.pipeline import (
    BuildConfig,
    SampleSpec,
    build_config,
    clean_captions,
    read_jsonl,
    resolve_split,
    write_dataset,
)
from shards.report import BuildReport, ShardsError, SkipReport


def build_features(
    features_file: str | Path, captions_file: str | Path, out_dir: str | Path, **options: Any
) -> BuildReport:
    """Build ``out_dir/<split>/shard-*.tar``; ``options`` are ``BuildConfig`` fields
    (``feature_dtype`` picks float32 or float16 storage)."""
    config = build_config(options)
    features_file, captions_file = Path(features_file), Path(captions_file)
    if not captions_file.is_file():
        raise ShardsError(f"captions file not found: {captions_file}")
    features = open_features(features_file)
    report = SkipReport()
    specs = []
    # Line numbers count every physical line (blank or broken ones too): line i is row i - 1.
    for line_no, record in read_jsonl(captions_file, report):
        spec = _spec_from_record(record, line_no, len(features), config, report)
        if spec is not None:
            specs.append(spec)
    source = {
        "type": "features",
        "features_file": str(features_file),
        "features_sha256": sha256_file(features_file),
        "captions_file": str(captions_file),
        "captions_sha256": sha256_file(captions_file),
        "source_dtype": str(features.dtype),
        "dtype": config.feature_dtype,
    }
    return write_dataset(
        specs,
        _load_rows(features, specs, config.feature_dtype),
        Path(out_dir),
        config,
        report,
        builder="shards.features",
        source=source,
        modality="features",
        feature_dim=int(features.shape[1]),
    )


def open_features(path: Path) -> np.ndarray:
    """The (rows, dim) array, memory-mapped so a 10 GB file costs no RAM up front."""
    if not path.is_file():
        raise ShardsError(f"features file not found: {path}")
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ShardsError(f"{path} is not a readable .npy array ({err})") from None
    if not isinstance(features, np.ndarray) or features.ndim != 2:
        shape = getattr(features, "shape", None)
        raise ShardsError(f"{path}: expected a 2-D array (rows, dim), got shape {shape}")
    if not (
        np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)
    ):
        raise ShardsError(f"{path}: expected numeric features, got dtype {features.dtype}")
    return features


def _spec_from_record(
    record: dict, line_no: int, num_rows: int, config: BuildConfig, report: SkipReport
) -> SampleSpec | None:
    where = f"line {line_no}"
    if "captions" not in record:
        report.skip("missing_field", f"{where}: no 'captions'")
        return None
    row = record.get("row", line_no - 1)
    if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < num_rows:
        report.skip("bad_field", f"{where}: row {row!r} is not in 0..{num_rows - 1}")
        return None
    captions = clean_captions(record["captions"], where, report)
    if captions is None:
        return None
    source_id = record.get("id", row)
    split = resolve_split(record.get("split"), str(source_id), config, where, report)
    if split is None:
        return None
    labels = record.get("labels", {})
    return SampleSpec(split, captions, labels, source_id, where=f"{where} (row {row})", row=row)


def _load_rows(
    features: np.ndarray, specs: list[SampleSpec], dtype: str
) -> Iterator[Payload | Skip]:
    for spec in specs:
        with np.errstate(over="ignore"):  # float16 overflow becomes Inf, caught just below
            row = np.ascontiguousarray(features[spec.row], dtype=dtype)
        if not np.isfinite(row).all():
            yield Skip("bad_feature", "NaN or Inf")
            continue
        buf = io.BytesIO()
        np.save(buf, row, allow_pickle=False)
        yield Payload("feat.npy", buf.getvalue())
