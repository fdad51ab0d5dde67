"""The jsonl builder on the real Flickr8k 1k subset, exactly as it ships."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmr.data.manifest import read_manifest
from shards import build_jsonl, validate_dataset
from shards_fixtures import read_split

FLICKR = Path("/work/shared/data/flickr8k_1k")


@pytest.mark.skipif(not FLICKR.is_dir(), reason=f"{FLICKR} not present on this machine")
def test_flickr8k_1k_builds_every_image(tmp_path):
    out = tmp_path / "flickr"
    report = build_jsonl(FLICKR / "captions.jsonl", FLICKR, out, workers=2, progress=False)
    assert report.samples == {"train": 753, "val": 113, "test": 125, "none": 9}
    assert report.skipped == {}
    manifest = read_manifest(out / "train")
    assert manifest.image_format == ["jpg"]
    assert manifest.captions_per_sample == {"min": 5, "mean": 5.0, "max": 5}
    assert len(manifest.shards) == 8
    (first,) = read_split(out, "none")[:1]
    assert first["data"] == (FLICKR / first["json"]["id"]).read_bytes()
    assert validate_dataset(out) == []
