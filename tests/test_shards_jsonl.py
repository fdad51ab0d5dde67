"""The jsonl builder on small real image files: counts, splits, round-trip, images, determinism."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib

import pytest
from PIL import Image

from cmr.config import ConfigError
from cmr.data.manifest import read_manifest, sha256_file
from shards import ShardsError, build_jsonl
from shards_fixtures import (
    make_image_dataset,
    read_split,
    split_dirs,
    tar_digests,
    write_image,
    write_jsonl,
)


def test_split_mapping_counts_and_round_trip(tmp_path):
    captions = make_image_dataset(tmp_path / "src", num_images=12)
    out = tmp_path / "out"
    report = build_jsonl(captions, tmp_path / "src", out, workers=0, progress=False)

    # dev and validation -> val, a missing split -> train, "none" keeps its own directory.
    assert report.samples == {"none": 2, "test": 2, "train": 4, "val": 4}
    assert split_dirs(out) == {"none", "test", "train", "val"}
    assert report.skipped == {}
    lines = [json.loads(line) for line in captions.read_text().splitlines()]
    val = read_split(out, "val")
    expected = [r for r in lines if r.get("split") in ("dev", "validation")]
    assert [s["json"]["captions"] for s in val] == [r["captions"] for r in expected]
    assert [s["json"]["id"] for s in val] == [r["image"] for r in expected]
    assert [s["json"]["labels"] for s in val] == [r.get("labels", {}) for r in expected]
    for sample, record in zip(val, expected, strict=True):
        # Untouched JPEG/PNG bytes pass through as they are.
        assert sample["data"] == (tmp_path / "src" / record["image"]).read_bytes()
        assert sample["ext"] == record["image"].rsplit(".", 1)[1]
        assert "." not in sample["key"]


def test_manifest_lists_every_shard_with_its_sha256(tmp_path):
    captions = make_image_dataset(tmp_path / "src", num_images=12)
    out = tmp_path / "out"
    build_jsonl(captions, tmp_path / "src", out, shard_size=3, workers=0, progress=False)
    manifest = read_manifest(out / "val")
    assert [s.name for s in manifest.shards] == ["shard-000000.tar", "shard-000001.tar"]
    assert [s.num_samples for s in manifest.shards] == [3, 1]
    for shard in manifest.shards:
        path = out / "val" / shard.name
        assert shard.sha256 == sha256_file(path)
        assert shard.num_bytes == path.stat().st_size
    assert manifest.modality == "image"
    assert manifest.image_format == ["jpg", "png"]
    assert manifest.captions_per_sample == {"min": 2, "mean": 2.0, "max": 2}
    assert manifest.builder == "shards.jsonl"
    assert manifest.source["captions_sha256"] == sha256_file(captions)
    # Tar headers carry nothing machine- or time-dependent.
    with tarfile.open(out / "val" / "shard-000000.tar") as tar:
        for info in tar:
            assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (
                0,
                0,
                0,
                "",
                "",
                0o444,
            )


def test_split_fractions_hash_unsplit_samples_deterministically(tmp_path):
    records = []
    for i in range(40):
        write_image(tmp_path / f"{i}.jpg", size=(8, 8), seed=i)
        records.append({"image": f"{i}.jpg", "captions": f"caption {i}"})
    records[0]["split"] = "restval"  # an explicit split is kept, never hashed
    captions = write_jsonl(tmp_path / "c.jsonl", records)
    first = build_jsonl(
        captions,
        tmp_path,
        tmp_path / "a",
        split_fractions=(0.5, 0.25, 0.25),
        workers=0,
        progress=False,
    )
    second = build_jsonl(
        captions,
        tmp_path,
        tmp_path / "b",
        split_fractions=[0.5, 0.25, 0.25],
        workers=0,
        progress=False,
    )
    assert first.samples == second.samples
    assert first.samples["restval"] == 1
    assert set(first.samples) == {"train", "val", "test", "restval"}
    assert first.num_samples == 40
    assert tar_digests(tmp_path / "a") == tar_digests(tmp_path / "b")
    ids = {s["json"]["id"] for s in read_split(tmp_path / "a", "val")}
    assert len(ids) == first.samples["val"]


def test_builds_are_identical_for_any_number_of_workers(tmp_path):
    captions = make_image_dataset(tmp_path / "src", num_images=30)
    build_jsonl(
        captions, tmp_path / "src", tmp_path / "w0", shard_size=4, workers=0, progress=False
    )
    build_jsonl(
        captions,
        tmp_path / "src",
        tmp_path / "w2",
        shard_size=4,
        workers=2,
        progress=False,
        max_size=18,
    )
    build_jsonl(
        captions,
        tmp_path / "src",
        tmp_path / "w0r",
        shard_size=4,
        workers=0,
        progress=False,
        max_size=18,
    )
    plain, resized, resized_again = (tar_digests(tmp_path / d) for d in ("w0", "w2", "w0r"))
    assert len(plain) == 10 and plain != resized
    assert resized == resized_again  # 2 worker processes vs none: same bytes


def test_max_size_bounds_the_longer_side_and_keeps_small_images(tmp_path):
    write_image(tmp_path / "wide.jpg", size=(300, 120), seed=1)
    write_image(tmp_path / "tall.png", size=(50, 200), fmt="PNG", mode="RGBA", seed=2)
    write_image(tmp_path / "small.jpg", size=(60, 40), seed=3)
    write_image(tmp_path / "cmyk.jpg", size=(150, 90), mode="CMYK", seed=4)
    records = [
        {"image": n, "captions": n} for n in ("wide.jpg", "tall.png", "small.jpg", "cmyk.jpg")
    ]
    captions = write_jsonl(tmp_path / "c.jsonl", records)
    build_jsonl(captions, tmp_path, tmp_path / "out", max_size=100, workers=0, progress=False)
    samples = {s["json"]["id"]: s for s in read_split(tmp_path / "out", "train")}
    images = {name: Image.open(io.BytesIO(s["data"])) for name, s in samples.items()}
    assert images["wide.jpg"].size == (100, 40) and images["wide.jpg"].format == "JPEG"
    assert images["tall.png"].size == (25, 100) and images["tall.png"].format == "PNG"
    assert images["tall.png"].mode == "RGBA"  # transparency survives
    assert images["cmyk.jpg"].size == (100, 60) and images["cmyk.jpg"].mode == "RGB"
    assert samples["small.jpg"]["data"] == (tmp_path / "small.jpg").read_bytes()


def test_format_comes_from_the_bytes_not_the_extension(tmp_path):
    write_image(tmp_path / "photo.png", size=(16, 16), fmt="JPEG")  # a JPEG named .png
    write_image(tmp_path / "anim.gif", size=(16, 16), fmt="GIF", mode="L")
    write_image(tmp_path / "pic.webp", size=(16, 16), fmt="WEBP")
    write_image(tmp_path / "pic.bmp", size=(16, 16), fmt="BMP")
    names = ["photo.png", "anim.gif", "pic.webp", "pic.bmp"]
    captions = write_jsonl(tmp_path / "c.jsonl", [{"image": n, "captions": n} for n in names])
    build_jsonl(captions, tmp_path, tmp_path / "out", workers=0, progress=False)
    samples = read_split(tmp_path / "out", "train")
    assert [s["ext"] for s in samples] == ["jpg", "png", "png", "png"]
    assert samples[0]["data"] == (tmp_path / "photo.png").read_bytes()
    for sample in samples[1:]:
        image = Image.open(io.BytesIO(sample["data"]))
        assert image.format == "PNG" and image.size == (16, 16)


def test_rebuild_replaces_old_shards_of_the_split(tmp_path):
    captions = make_image_dataset(tmp_path / "src", num_images=12)
    out = tmp_path / "out"
    build_jsonl(captions, tmp_path / "src", out, shard_size=1, workers=0, progress=False)
    assert len(list((out / "train").glob("shard-*.tar"))) == 4
    build_jsonl(captions, tmp_path / "src", out, shard_size=3, workers=0, progress=False)
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "manifest.json",
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    assert len(read_split(out, "train")) == 4


def test_user_errors_are_one_line(tmp_path):
    captions = make_image_dataset(tmp_path / "src", num_images=2)
    with pytest.raises(ShardsError, match="captions file not found"):
        build_jsonl(tmp_path / "nope.jsonl", tmp_path / "src", tmp_path / "out")
    with pytest.raises(ShardsError, match="images root is not a directory"):
        build_jsonl(captions, tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ConfigError, match="split_fractions: need three fractions"):
        build_jsonl(captions, tmp_path / "src", tmp_path / "out", split_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="shard_size: must be at least 1"):
        build_jsonl(captions, tmp_path / "src", tmp_path / "out", shard_size=0)
    with pytest.raises(ConfigError, match="shard_sizes: unknown field"):
        build_jsonl(captions, tmp_path / "src", tmp_path / "out", shard_sizes=3)
    assert not (tmp_path / "out").exists()


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG that claims ``width`` x ``height`` but holds almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path):
    # A decompression bomb is refused by its declared size, never decoded (which would
    # need 30 GB here); the same header at a small size is just a corrupt image.
    (tmp_path / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    (tmp_path / "tiny.png").write_bytes(png_header_only(4, 4))
    write_image(tmp_path / "ok.jpg", size=(10, 10))
    names = ["bomb.png", "tiny.png", "ok.jpg"]
    captions = write_jsonl(tmp_path / "c.jsonl", [{"image": n, "captions": n} for n in names])
    report = build_jsonl(captions, tmp_path, tmp_path / "out", workers=0, progress=False)
    assert report.skipped == {"too_many_pixels": 1, "corrupt_image": 1}
    assert report.examples["too_many_pixels"] == ["line 1 (bomb.png) (100000x100000)"]
    assert report.samples == {"train": 1}
