"""Shards from a JSONL captions file: one image and its captions per line.

Each line: ``{"image": "<path relative to images root>", "captions": [...] or "...",
"split": "train|val|dev|test|...", "labels": <any JSON>, "id": <any JSON>}``; only
``image`` and ``captions`` are required. ``dev``/``valid``/``validation`` become
``val``; any other split name (``none``, ``restval``) gets its own directory, so no
sample is silently dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmr.data.manifest import sha256_file
from shards.pipeline import (
    SampleSpec,
    build_config,
    clean_captions,
    load_images,
    read_jsonl,
    resolve_split,
    write_dataset,
)
from shards.report import BuildReport, ShardsError, SkipReport


def build_jsonl(
    captions_file: str | Path, images_root: str | Path, out_dir: str | Path, **options: Any
) -> BuildReport:
    """Build ``out_dir/<split>/shard-*.tar``; ``options`` are ``BuildConfig`` fields."""
    config = build_config(options)
    captions_file, images_root = Path(captions_file), Path(images_root)
    if not captions_file.is_file():
        raise ShardsError(f"captions file not found: {captions_file}")
    if not images_root.is_dir():
        raise ShardsError(f"images root is not a directory: {images_root}")
    report = SkipReport()
    specs = []
    for line_no, record in read_jsonl(captions_file, report):
        spec = _spec_from_record(record, f"line {line_no}", images_root, config, report)
        if spec is not None:
            specs.append(spec)
    source = {
        "type": "jsonl",
        "captions_file": str(captions_file),
        "captions_sha256": sha256_file(captions_file),
        "images_root": str(images_root),
    }
    return write_dataset(
        specs,
        load_images(specs, config),
        Path(out_dir),
        config,
        report,
        builder="shards.jsonl",
        source=source,
    )


def _spec_from_record(
    record: dict, where: str, images_root: Path, config, report: SkipReport
) -> SampleSpec | None:
    for field in ("image", "captions"):
        if field not in record:
            report.skip("missing_field", f"{where}: no {field!r}")
            return None
    image = record["image"]
    if not isinstance(image, str) or not image.strip():
        report.skip("bad_field", f"{where}: image must be a non-empty path string")
        return None
    captions = clean_captions(record["captions"], where, report)
    if captions is None:
        return None
    source_id = record.get("id", image)
    split = resolve_split(record.get("split"), str(source_id), config, where, report)
    if split is None:
        return None
    return SampleSpec(
        split=split,
        captions=captions,
        labels=record.get("labels", {}),
        source_id=source_id,
        where=f"{where} ({image})",
        image=str(images_root / image),
    )
