"""``validate`` catches damaged shards (naming them), ``inspect`` reports the documented keys."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from cmr.data.manifest import read_manifest, sha256_file, write_manifest
from shards import ShardsError, build_jsonl, inspect_dataset, validate_dataset
from shards_fixtures import make_image_dataset, run_cli


@pytest.fixture
def built(tmp_path):
    captions = make_image_dataset(tmp_path / "src", num_images=12)
    out = tmp_path / "out"
    build_jsonl(captions, tmp_path / "src", out, shard_size=2, workers=0, progress=False)
    return out


def rewrite_tar(path, keep):
    """Rewrite a shard keeping only the members ``keep(name)`` accepts (same header style)."""
    with tarfile.open(path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar if keep(info.name)]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))


def reseal_manifest(split_dir):
    """Make the manifest agree with the files again, so only content checks can fail."""
    manifest = read_manifest(split_dir)
    for shard in manifest.shards:
        shard.sha256 = sha256_file(split_dir / shard.name)
        shard.num_bytes = (split_dir / shard.name).stat().st_size
    write_manifest(manifest, split_dir)


def test_a_good_build_validates(built):
    assert validate_dataset(built) == []
    assert validate_dataset(built, decode=True) == []
    result = run_cli("validate", str(built), "--decode")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("all decoded")


def test_flipped_byte_fails_and_names_the_shard(built):
    shard = built / "val" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1600] ^= 0x01  # inside the image bytes of the first sample
    shard.write_bytes(bytes(data))
    assert validate_dataset(built) == [
        "val/shard-000001.tar: sha256 does not match the manifest (file changed)"
    ]
    result = run_cli("validate", str(built))
    assert result.returncode == 1
    assert "val/shard-000001.tar: sha256" in result.stdout
    assert "FAILED: 1 problem(s)" in result.stdout


def test_truncated_shard_fails(built):
    shard = built / "train" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    problems = validate_dataset(built)
    num_bytes = read_manifest(built / "train").shards[0].num_bytes
    assert problems[0] == f"train/shard-000000.tar: 1000 bytes, manifest says {num_bytes}"
    assert problems[1].startswith("train/shard-000000.tar: sha256 does not match")
    assert problems[2].startswith("train/shard-000000.tar: unreadable tar")
    assert len(problems) == 3


def test_deleted_sample_fails(built):
    shard = built / "test" / "shard-000000.tar"
    rewrite_tar(shard, keep=lambda name: not name.startswith("00000001."))
    problems = validate_dataset(built)
    assert "test/shard-000000.tar: 1 samples, manifest says 2" in problems
    assert any("sha256 does not match" in p for p in problems)
    result = run_cli("validate", str(built))
    assert result.returncode == 1 and "test/shard-000000.tar" in result.stdout


def test_sample_contents_are_checked(built):
    split_dir = built / "train"
    rewrite_tar(split_dir / "shard-000000.tar", keep=lambda name: name != "00000000.jpg")
    with tarfile.open(split_dir / "shard-000001.tar") as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar]
    with tarfile.open(split_dir / "shard-000001.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name.endswith(".json"):
                data = json.dumps({"captions": [], "labels": {}, "id": "x"}).encode()
            elif info.name.startswith("00000003"):
                data = b"garbage, not a jpeg"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    reseal_manifest(split_dir)
    assert validate_dataset(built) == [
        "train/shard-000000.tar: sample 00000000: "
        "expected exactly one of ['jpg', 'png'], found none",
        "train/shard-000001.tar: sample 00000002: json has no non-empty 'captions' list",
        "train/shard-000001.tar: sample 00000003: json has no non-empty 'captions' list",
    ]
    assert validate_dataset(built, decode=True)[-1] == (
        "train/shard-000001.tar: sample 00000003: jpg does not decode (UnidentifiedImageError)"
    )


def test_stale_and_missing_shards_are_reported(built):
    (built / "val" / "shard-000007.tar").write_bytes(b"")
    (built / "test" / "shard-000000.tar").unlink()
    assert validate_dataset(built) == [
        "test/shard-000000.tar: missing",
        "val/shard-000007.tar: shard file not listed in the manifest (stale?)",
    ]


def test_inspect_reports_documented_keys(built):
    summary = inspect_dataset(built)
    assert set(summary) == {"dir", "splits", "samples", "total_bytes"}
    assert set(summary["splits"]) == {"none", "test", "train", "val"}
    val = summary["splits"]["val"]
    assert set(val) == {
        "samples",
        "shards",
        "captions_per_sample",
        "modality",
        "image_format",
        "feature_dim",
        "skipped",
        "total_bytes",
        "builder",
    }
    assert (val["samples"], val["shards"], val["modality"]) == (4, 2, "image")
    assert val["image_format"] == ["jpg", "png"]
    assert val["captions_per_sample"] == {"min": 2, "mean": 2.0, "max": 2}
    assert val["total_bytes"] == sum(p.stat().st_size for p in (built / "val").glob("*.tar"))
    assert summary["samples"] == 12
    result = run_cli("inspect", str(built))
    assert result.returncode == 0 and json.loads(result.stdout)["splits"]["val"] == val


def test_not_a_dataset(tmp_path):
    with pytest.raises(ShardsError, match="dataset directory not found"):
        validate_dataset(tmp_path / "nowhere")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "shard-000000.tar").write_bytes(b"")
    assert validate_dataset(tmp_path) == [
        "train: shard files but no manifest.json (interrupted build?)"
    ]
    with pytest.raises(ShardsError, match="not a built dataset"):
        inspect_dataset(tmp_path)
