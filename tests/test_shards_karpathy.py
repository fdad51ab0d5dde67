"""The Karpathy split-file builder: COCO filepaths, raw captions, restval handling."""

from __future__ import annotations

import json

import pytest

from cmr.data.manifest import read_manifest
from shards import ShardsError, build_karpathy
from shards_fixtures import read_split, split_dirs, write_image


def make_karpathy(root):
    images = []
    splits = ["train", "restval", "val", "test", "restval", "train"]
    for i, split in enumerate(splits):
        folder = "train2014" if split == "train" else "val2014"
        write_image(root / folder / f"COCO_{i:03d}.jpg", size=(24, 18), seed=i)
        images.append(
            {
                "filepath": folder,
                "filename": f"COCO_{i:03d}.jpg",
                "split": split,
                "imgid": i,
                "cocoid": 1000 + i,
                "sentids": [2 * i, 2 * i + 1],
                "sentences": [
                    {"raw": f"  A photo number {i}. ", "tokens": ["a", "photo"], "imgid": i},
                    {"tokens": ["only", "tokens", str(i)], "imgid": i},
                ],
            }
        )
    images.append(
        {
            "filepath": "val2014",
            "filename": "COCO_missing.jpg",
            "split": "val",
            "imgid": 99,
            "sentences": [{"raw": "gone"}],
        }
    )
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


def test_karpathy_splits_captions_and_ids(tmp_path):
    json_file = make_karpathy(tmp_path)
    out = tmp_path / "out"
    report = build_karpathy(json_file, tmp_path, out, workers=0, progress=False)
    assert report.samples == {"restval": 2, "test": 1, "train": 2, "val": 1}
    assert report.skipped == {"missing_image": 1}
    assert split_dirs(out) == {"restval", "test", "train", "val"}
    train = read_split(out, "train")
    assert [s["json"]["id"] for s in train] == [1000, 1005]
    assert train[0]["json"]["captions"] == ["A photo number 0.", "only tokens 0"]
    assert train[0]["data"] == (tmp_path / "train2014" / "COCO_000.jpg").read_bytes()
    manifest = read_manifest(out / "restval")
    assert manifest.source["dataset"] == "coco"
    assert manifest.source["restval_into_train"] is False


def test_restval_into_train(tmp_path):
    json_file = make_karpathy(tmp_path)
    out = tmp_path / "out"
    report = build_karpathy(
        json_file, tmp_path, out, restval_into_train=True, workers=0, progress=False
    )
    assert report.samples == {"test": 1, "train": 4, "val": 1}
    assert [s["json"]["id"] for s in read_split(out, "train")] == [1000, 1001, 1004, 1005]


def test_flickr_style_entries_without_filepath(tmp_path):
    write_image(tmp_path / "1000.jpg", seed=1)
    json_file = tmp_path / "dataset_flickr30k.json"
    json_file.write_text(
        json.dumps(
            {
                "dataset": "flickr30k",
                "images": [
                    {
                        "filename": "1000.jpg",
                        "split": "val",
                        "imgid": 7,
                        "sentences": [{"raw": "a dog"}],
                    },
                    {
                        "filename": "1000.jpg",
                        "split": "val",
                        "imgid": 8,
                        "sentences": [{"raw": " "}],
                    },
                    {"split": "val", "imgid": 9, "sentences": [{"raw": "no filename"}]},
                    "not an object",
                ],
            }
        )
    )
    report = build_karpathy(json_file, tmp_path, tmp_path / "out", workers=0, progress=False)
    assert report.samples == {"val": 1}
    assert report.skipped == {"empty_caption": 1, "missing_field": 1, "bad_field": 1}
    (sample,) = read_split(tmp_path / "out", "val")
    assert sample["json"] == {"captions": ["a dog"], "labels": {}, "id": 7}


def test_unusable_karpathy_file_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(ShardsError, match="is not valid JSON"):
        build_karpathy(bad, tmp_path, tmp_path / "out")
    bad.write_text('{"annotations": []}')
    with pytest.raises(ShardsError, match='has no "images" list'):
        build_karpathy(bad, tmp_path, tmp_path / "out")
    with pytest.raises(ShardsError, match="Karpathy JSON not found"):
        build_karpathy(tmp_path / "nope.json", tmp_path, tmp_path / "out")
