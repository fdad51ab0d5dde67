"""The precomputed-features builder: rows round-trip, bad rows are skipped, dtype is honoured."""

from __future__ import annotations

import io

import numpy as np
import pytest

from cmr.data.manifest import read_manifest
from shards import ShardsError, build_features, validate_dataset
from shards_fixtures import read_split, write_jsonl


def make_features(root, num_rows=8, dim=5):
    rows = np.arange(num_rows * dim, dtype=np.float64).reshape(num_rows, dim) / 7.0
    rows[3, 1] = np.nan  # line 4 (train): bad_feature
    rows[5, 4] = np.inf  # line 6 (train): bad_feature
    records = [
        {"captions": [f"row {i}"], "split": "train" if i % 2 else "test"} for i in range(num_rows)
    ]
    records[6] = {"captions": "row 0 again", "row": 0, "id": "six", "labels": {"k": 1}}
    records[7] = {"captions": ["bad row"], "row": num_rows}  # bad_field: out of range
    np.save(root / "feats.npy", rows)
    return rows, root / "feats.npy", write_jsonl(root / "caps.jsonl", records)


def load_row(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def test_feature_rows_round_trip_and_bad_rows_are_skipped(tmp_path):
    rows, feats, caps = make_features(tmp_path)
    out = tmp_path / "out"
    report = build_features(feats, caps, out, progress=False)
    assert report.skipped == {"bad_field": 1, "bad_feature": 2}
    assert report.samples == {"test": 3, "train": 2}
    train = read_split(out, "train")
    assert [s["json"]["id"] for s in train] == [1, "six"]
    assert train[1]["json"] == {"captions": ["row 0 again"], "labels": {"k": 1}, "id": "six"}
    for sample, row in zip(train, (1, 0), strict=True):
        assert sample["ext"] == "feat.npy"
        stored = load_row(sample["data"])
        assert stored.dtype == np.float32 and stored.shape == (5,)
        np.testing.assert_array_equal(stored, rows[row].astype(np.float32))
    test = read_split(out, "test")
    assert [s["json"]["id"] for s in test] == [0, 2, 4]
    manifest = read_manifest(out / "train")
    assert (manifest.modality, manifest.feature_dim, manifest.image_format) == ("features", 5, [])
    assert manifest.source["source_dtype"] == "float64"
    assert validate_dataset(out, decode=True) == []


def test_float16_storage_and_overflow_is_a_bad_feature(tmp_path):
    rows = np.array([[1.5, -2.25], [1e6, 0.0], [0.1, 0.2]], dtype=np.float32)
    np.save(tmp_path / "f.npy", rows)
    caps = write_jsonl(tmp_path / "c.jsonl", [{"captions": f"r{i}"} for i in range(3)])
    report = build_features(
        tmp_path / "f.npy", caps, tmp_path / "out", feature_dtype="float16", progress=False
    )
    assert report.skipped == {"bad_feature": 1}  # 1e6 does not fit in float16
    stored = [load_row(s["data"]) for s in read_split(tmp_path / "out", "train")]
    assert [r.dtype for r in stored] == [np.float16, np.float16]
    np.testing.assert_array_equal(stored[0], np.array([1.5, -2.25], dtype=np.float16))
    np.testing.assert_array_equal(stored[1], rows[2].astype(np.float16))


def test_unusable_feature_files_are_user_errors(tmp_path):
    caps = write_jsonl(tmp_path / "c.jsonl", [{"captions": "x"}])
    np.save(tmp_path / "3d.npy", np.zeros((2, 3, 4), dtype=np.float32))
    with pytest.raises(
        ShardsError, match=r"expected a 2-D array \(rows, dim\), got shape \(2, 3, 4\)"
    ):
        build_features(tmp_path / "3d.npy", caps, tmp_path / "out")
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(ShardsError, match="is not a readable .npy array"):
        build_features(tmp_path / "junk.npy", caps, tmp_path / "out")
    with pytest.raises(ShardsError, match="features file not found"):
        build_features(tmp_path / "none.npy", caps, tmp_path / "out")
    np.save(tmp_path / "obj.npy", np.array([["a", "b"]], dtype=object), allow_pickle=True)
    with pytest.raises(ShardsError, match="is not a readable .npy array"):
        build_features(tmp_path / "obj.npy", caps, tmp_path / "out")
