"""A fuzzed shard set with every fault the loader must survive: skipped, counted, no crash."""

import io
import json
import struct
import zlib

import numpy as np
import pytest

from cmr.config import from_dict
from cmr.data.loader import build_loader, build_vocabulary
from cmr.data.pipeline import DataConfig
from cmr.data.source import DataError
from tests.tiny_data import image_bytes, sample_files, write_split


def png_claiming(width, height):
    """A PNG header that promises a huge image (the body is tiny): a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def meta(captions):
    return json.dumps({"captions": captions, "id": "bad"}).encode()


IMAGE_FAULTS = {
    3: ({"json": meta(["fine"]), "png": b"\x89PNG garbage"}, "corrupt_image"),
    5: ({"json": meta(["fine"]), "png": image_bytes(5)[:60]}, "corrupt_image"),  # truncated file
    8: ({"json": meta(["   "]), "png": image_bytes(8)}, "empty_caption"),
    9: ({"json": json.dumps({"id": "x"}).encode(), "png": image_bytes(9)}, "missing_caption"),
    12: ({"json": b'{"captions": ["caf\xe9"]}', "png": image_bytes(12)}, "non_utf8_text"),
    14: ({"json": b'{"captions": [', "png": image_bytes(14)}, "corrupt_json"),
    17: ({"json": meta(["big"]), "png": png_claiming(100_000, 100_000)}, "too_many_pixels"),
}


def truncate_tar(path, keep_bytes):
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])


@pytest.fixture()
def fuzzed(tmp_path):
    overrides = {i: files for i, (files, _) in IMAGE_FAULTS.items()}
    split_dir = write_split(tmp_path, "train", 40, shard_size=10, overrides=overrides)
    # Shard 3 (samples 30..39) loses its second half: 5 samples the manifest promises never come.
    shard = split_dir / "shard-000003.tar"
    truncate_tar(shard, shard.stat().st_size // 2)
    return tmp_path


def expected_counts(num_truncated):
    counts = {}
    for _, reason in IMAGE_FAULTS.values():
        counts[reason] = counts.get(reason, 0) + 1
    counts["truncated_shard"] = num_truncated
    return counts


def test_every_fault_is_skipped_and_counted(fuzzed):
    cfg = from_dict(DataConfig, {"shards": str(fuzzed), "batch_size": 5, "num_workers": 2,
                                 "image": {"size": 16}, "max_bad_fraction": 0.9, "max_pixels": 10_000_000})
    vocab = build_vocabulary(cfg)
    loader = build_loader(cfg, vocab, split="train", mode="train")
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 8  # 40 planned samples / 5: batch count is unchanged by damage
    counts = dict(loader.skip_counts)
    # The truncated tar: the reader keeps every complete sample before the cut.
    assert counts.pop("truncated_shard") in range(4, 8)
    want = expected_counts(0)
    want.pop("truncated_shard")
    assert counts == want
    good = sum(b.num_samples for b in batches)
    assert good + sum(loader.skip_counts.values()) == 40
    assert loader.num_seen == 40


def test_eval_masks_bad_samples_instead_of_shifting(fuzzed):
    cfg = from_dict(DataConfig, {"shards": str(fuzzed), "batch_size": 6, "num_workers": 0,
                                 "image": {"size": 16}, "max_bad_fraction": 0.9, "max_pixels": 10_000_000})
    vocab = build_vocabulary(cfg)
    batches = list(build_loader(cfg, vocab, split="train", mode="eval"))
    assert all(b.size == 6 for b in batches)
    good_ids = [i for b in batches for i, m in zip(b.ids, b.mask.tolist()) if m]
    assert "bad" not in good_ids and len(good_ids) == len(set(good_ids))


def test_too_many_bad_samples_stop_the_run_with_numbers(fuzzed):
    cfg = from_dict(DataConfig, {"shards": str(fuzzed), "batch_size": 5, "num_workers": 0,
                                 "image": {"size": 16}, "max_bad_fraction": 0.05,
                                 "min_samples_for_bad_check": 20, "max_pixels": 10_000_000})
    vocab = build_vocabulary(cfg)
    loader = build_loader(cfg, vocab, split="train", mode="train")
    with pytest.raises(DataError, match=r"of \d+ samples were unusable .*max_bad_fraction=0.05.*shards validate"):
        list(loader)


def test_wrong_feature_dimension_is_skipped(tmp_path):
    good = sample_files(0, "features", 8)
    buf = io.BytesIO()
    np.save(buf, np.zeros(7, dtype=np.float32))
    bad = dict(good, **{"feat.npy": buf.getvalue()})
    nan = io.BytesIO()
    np.save(nan, np.full(8, np.nan, dtype=np.float32))
    write_split(tmp_path, "train", 12, shard_size=4, modality="features", feature_dim=8,
                overrides={2: bad, 6: dict(good, **{"feat.npy": nan.getvalue()})})
    cfg = from_dict(DataConfig, {"shards": str(tmp_path), "batch_size": 4, "num_workers": 0,
                                 "max_bad_fraction": 0.5})
    loader = build_loader(cfg, build_vocabulary(cfg), split="train", mode="train")
    batches = list(loader)
    assert sum(b.num_samples for b in batches) == 10
    assert dict(loader.skip_counts) == {"bad_feature_dim": 1, "corrupt_feature": 1}


def test_missing_shard_file_is_counted_not_fatal(tmp_path):
    split_dir = write_split(tmp_path, "train", 20, shard_size=5)
    (split_dir / "shard-000001.tar").unlink()
    cfg = from_dict(DataConfig, {"shards": str(tmp_path), "batch_size": 5, "num_workers": 0,
                                 "image": {"size": 16}, "max_bad_fraction": 0.5})
    loader = build_loader(cfg, build_vocabulary(cfg), split="train", mode="train")
    batches = list(loader)
    assert len(batches) == 4
    assert dict(loader.skip_counts) == {"missing_shard": 5}
