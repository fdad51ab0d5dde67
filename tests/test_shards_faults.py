"""A captions file and image folder with every kind of fault: the good samples all land,
every bad one is skipped and counted under the right reason, and nothing crashes."""

from __future__ import annotations

import json

from cmr.data.manifest import read_manifest
from shards import build_jsonl
from shards_fixtures import read_split, run_cli, write_image, write_jsonl

GOOD = ["good0.jpg", "good1.png", "good2.jpg", "dropped_one.jpg"]


def make_faulty_dataset(root):
    """Returns the captions file; GOOD lists the images that must land (in order)."""
    write_image(root / "good0.jpg", size=(30, 20), seed=0)
    write_image(root / "good1.png", size=(30, 20), fmt="PNG", seed=1)
    write_image(root / "good2.jpg", size=(30, 20), seed=2)
    write_image(root / "dropped_one.jpg", size=(30, 20), seed=3)
    write_image(root / "big.jpg", size=(80, 80), seed=4)  # over --max-pixels 5000
    full = write_image(root / "full.jpg", size=(64, 64), seed=5).read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "text.jpg").write_text("this is not an image\n")
    (root / "empty.jpg").write_bytes(b"")
    png = write_image(root / "crc.png", size=(16, 16), fmt="PNG", seed=6).read_bytes()
    flipped = bytearray(png)
    flipped[len(png) // 2] ^= 0xFF
    (root / "crc.png").write_bytes(bytes(flipped))
    records = [
        {"image": "good0.jpg", "captions": ["a red thing", "something red"], "split": "train"},
        {"image": "missing.jpg", "captions": ["gone"]},  # missing_image
        {"image": "truncated.jpg", "captions": ["cut"]},  # corrupt_image
        b'{"image": "good0.jpg", "captions": ["unterminated',  # broken_json_line
        {"image": "text.jpg", "captions": ["text"]},  # corrupt_image
        {"image": "good1.png", "captions": "a single string caption", "labels": [1, 2]},
        {"image": "empty.jpg", "captions": ["zero bytes"]},  # corrupt_image
        {"image": "good0.jpg", "captions": ["  ", ""]},  # empty_caption
        b'{"image": "good0.jpg", "captions": ["caf\xe9 latin-1"]}',  # non_utf8_text
        {"image": "big.jpg", "captions": ["too big"]},  # too_many_pixels
        {"captions": ["no image field"]},  # missing_field
        {"image": "good0.jpg"},  # missing_field
        {"image": "good0.jpg", "captions": ["x"], "split": "../escape"},  # bad_field
        {"image": "good0.jpg", "captions": [3, "x"]},  # bad_field
        b"[1, 2, 3]",  # broken_json_line (not an object)
        {"image": "crc.png", "captions": ["bad crc"]},  # corrupt_image
        {"image": "good2.jpg", "captions": ["ünïcödé ✓ 猫"], "split": "test", "id": "g2"},
        {"image": "dropped_one.jpg", "captions": ["", "kept", " "]},  # 2x empty_caption_dropped
        b'{"image": "good0.jpg", "captions": ["lone \\udc80 surrogate"]}',  # non_utf8_text
    ]
    return write_jsonl(root / "captions.jsonl", records)


EXPECTED_SKIPS = {
    "missing_image": 1,
    "corrupt_image": 4,
    "too_many_pixels": 1,
    "empty_caption": 1,
    "empty_caption_dropped": 2,
    "broken_json_line": 2,
    "non_utf8_text": 2,
    "missing_field": 2,
    "bad_field": 2,
}


def test_every_fault_is_skipped_and_counted_by_reason(tmp_path):
    captions = make_faulty_dataset(tmp_path)
    out = tmp_path / "out"
    report = build_jsonl(captions, tmp_path, out, max_pixels=5000, workers=2, progress=False)

    assert report.skipped == EXPECTED_SKIPS
    assert report.samples == {"train": 3, "test": 1}
    assert report.examples["missing_image"] == ["line 2 (missing.jpg) (No such file or directory)"]
    assert report.examples["broken_json_line"] == ["line 4", "line 15: not a JSON object"]
    assert report.examples["non_utf8_text"] == ["line 9", "line 19"]
    train = read_split(out, "train")
    assert [s["json"]["id"] for s in train] == ["good0.jpg", "good1.png", "dropped_one.jpg"]
    assert train[1]["json"] == {
        "captions": ["a single string caption"],
        "labels": [1, 2],
        "id": "good1.png",
    }
    assert train[2]["json"]["captions"] == ["kept"]
    for sample in train:
        assert sample["data"] == (tmp_path / sample["json"]["id"]).read_bytes()
    (test,) = read_split(out, "test")
    assert test["json"] == {"captions": ["ünïcödé ✓ 猫"], "labels": {}, "id": "g2"}
    assert read_manifest(out / "train").skipped == EXPECTED_SKIPS


def test_cli_reports_skips_and_exits_zero_without_traceback(tmp_path):
    captions = make_faulty_dataset(tmp_path)
    out = tmp_path / "out"
    result = run_cli(
        "build",
        "jsonl",
        "--captions",
        str(captions),
        "--images-root",
        str(tmp_path),
        "--out",
        str(out),
        "--max-pixels",
        "5000",
        "--workers",
        "0",
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "wrote 4 samples" in result.stdout
    for reason, count in EXPECTED_SKIPS.items():
        assert f"  {reason}: {count} (e.g. " in result.stdout
    summary = json.loads(run_cli("inspect", str(out)).stdout)
    assert summary["samples"] == 4
