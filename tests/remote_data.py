"""What test_remote.py and test_remote_s3.py share: the tiny dataset they serve, the data
config they read it with, and how they compare what a loader gives."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import torch

from cmr.config import from_dict
from cmr.data.loader import build_loader, build_vocabulary
from cmr.data.pipeline import DataConfig
from tests.tiny_data import add_member, image_bytes, write_split

NUM_TRAIN, SHARD = 45, 6


def write_dataset(root: Path) -> Path:
    """A train split of NUM_TRAIN samples in shards of SHARD, and a val split of 11."""
    write_split(root, "train", NUM_TRAIN, shard_size=SHARD)
    write_split(root, "val", 11, shard_size=4)
    return root


def make_cfg(shards, **overrides):
    base = {"shards": shards, "batch_size": 4, "num_workers": 0, "shuffle_buffer": 8, "image": {"size": 16},
            "retry_backoff_s": 0.05, "io_timeout_s": 5}
    base.update(overrides)
    return from_dict(DataConfig, base)


def local_reference(dataset: Path):
    """(config, vocabulary) of the dataset read from its local directory with 2 workers."""
    cfg = make_cfg(str(dataset), num_workers=2)
    return cfg, build_vocabulary(cfg)


def epoch_batches(cfg, vocab, epoch, *, rank=0, world=1, split="train", mode="train"):
    loader = build_loader(cfg, vocab, split=split, mode=mode, rank=rank, world_size=world)
    loader.set_epoch(epoch)
    return list(loader)


def assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys == b.keys
        assert torch.equal(a.images, b.images) and torch.equal(a.captions, b.captions)
        assert a.skipped == b.skipped


def picture_tar(path, count: int, side: int) -> list[tuple[str, bytes]]:
    """Write a tar of ``count`` samples (a ``side`` px PNG and a caption each) at ``path``;
    return its members as (name, bytes), in order."""
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            add_member(tar, f"{i:08d}.png", image_bytes(i, size=(side, side)))
            add_member(tar, f"{i:08d}.json", json.dumps({"captions": [f"picture {i}"]}).encode())
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]
