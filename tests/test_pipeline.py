"""The streaming pipeline in one process: delivery, order, resume, eval padding, formats."""

import io
import json
import time
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from cmr.config import ConfigError, from_dict
from cmr.data.loader import build_loader, build_vocabulary
from cmr.data.pipeline import DataConfig
from cmr.data.source import DataError
from tests.tiny_data import add_member, captions_for, image_bytes, write_split


def make_cfg(root, **overrides):
    base = {"shards": str(root), "batch_size": 4, "num_workers": 0, "shuffle_buffer": 8,
            "image": {"size": 16}}
    base.update(overrides)
    return from_dict(DataConfig, base)


def run_epoch(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def ids_of(batches):
    return [i for b in batches for i, m in zip(b.ids, b.mask.tolist()) if m]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_split(root, "train", 45, shard_size=6)
    write_split(root, "val", 11, shard_size=4)
    return root


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 2), (3, 1)])
def test_every_sample_once_per_epoch_and_equal_batch_counts(dataset, world, workers):
    cfg = make_cfg(dataset, num_workers=workers)
    vocab = build_vocabulary(cfg)
    for epoch in range(2):
        seen, counts = Counter(), []
        for rank in range(world):
            loader = build_loader(cfg, vocab, split="train", mode="train", rank=rank, world_size=world)
            batches = run_epoch(loader, epoch)
            counts.append(len(batches))
            assert len(batches) == len(loader)
            assert all(b.size == 4 for b in batches)
            seen.update(ids_of(batches))
        assert len(set(counts)) == 1, f"unequal batch counts over ranks: {counts}"
        assert max(seen.values()) == 1
        expected_used = counts[0] * 4 * world
        assert sum(seen.values()) == expected_used
        assert 45 - expected_used < 4 * world  # only the remainder is dropped
        assert loader.num_dropped == 45 - expected_used


def test_same_seed_same_batches_new_epoch_new_order(dataset):
    cfg = make_cfg(dataset, num_workers=2)
    vocab = build_vocabulary(cfg)
    a = run_epoch(build_loader(cfg, vocab, split="train", mode="train"), 0)
    b = run_epoch(build_loader(cfg, vocab, split="train", mode="train"), 0)
    c = run_epoch(build_loader(cfg, vocab, split="train", mode="train"), 1)
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and torch.equal(x.captions, y.captions)
    assert ids_of(a) != ids_of(c)


def test_worker_count_does_not_change_what_a_sample_looks_like(dataset):
    """Augmentation and caption choice are seeded by the sample, not by the worker."""
    cfg0, cfg2 = make_cfg(dataset, num_workers=0), make_cfg(dataset, num_workers=2)
    vocab = build_vocabulary(cfg0)
    views = {}
    for cfg in (cfg0, cfg2):
        for b in run_epoch(build_loader(cfg, vocab, split="train", mode="train"), 3):
            for i, key in enumerate(b.keys):
                img, cap = b.images[i], b.captions[i, : b.lengths[i]]
                if key in views:
                    assert torch.equal(views[key][0], img) and torch.equal(views[key][1], cap)
                views[key] = (img, cap)


@pytest.mark.parametrize("workers,stop_after", [(0, 3), (2, 5), (2, 1)])
def test_resume_mid_epoch_yields_exactly_the_rest(dataset, workers, stop_after):
    cfg = make_cfg(dataset, num_workers=workers)
    vocab = build_vocabulary(cfg)
    full = run_epoch(build_loader(cfg, vocab, split="train", mode="train"), 2)

    first = build_loader(cfg, vocab, split="train", mode="train")
    first.set_epoch(2)
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == stop_after:
            break
    state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint round trip
    assert state["samples_consumed"] == stop_after * 4

    resumed = build_loader(cfg, vocab, split="train", mode="train")
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(full)
    for got, want in zip(head + tail, full):
        assert got.keys == want.keys
        assert torch.equal(got.images, want.images) and torch.equal(got.captions, want.captions)

    sought = build_loader(cfg, vocab, split="train", mode="train")
    sought.seek(2, stop_after)
    assert [b.keys for b in sought] == [b.keys for b in tail]


def test_resume_mid_epoch_with_other_layout_is_refused_but_epoch_ends_are_fine(dataset):
    cfg = make_cfg(dataset, num_workers=2)
    vocab = build_vocabulary(cfg)
    loader = build_loader(cfg, vocab, split="train", mode="train")
    loader.set_epoch(4)
    for i, _ in enumerate(loader):
        if i == 2:
            mid = loader.state_dict()
    end = loader.state_dict()
    other = build_loader(make_cfg(dataset, num_workers=1), vocab, split="train", mode="train")
    with pytest.raises(DataError, match="with 1 ranks x 1 workers: the checkpoint was written with 1 x 2"):
        other.load_state_dict(mid)
    other.load_state_dict(end)
    assert other.epoch == 5 and other.batches_done == 0


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_delivers_all_with_padding_and_all_captions(dataset, world):
    cfg = make_cfg(dataset, num_workers=2)
    vocab = build_vocabulary(cfg)
    seen, counts = Counter(), []
    for rank in range(world):
        batches = run_epoch(build_loader(cfg, vocab, split="val", mode="eval", rank=rank, world_size=world), 0)
        counts.append(len(batches))
        for b in batches:
            assert b.size == 4
            assert (b.images[~b.mask] == 0).all()
            owners = b.caption_owner.tolist()
            assert all(b.mask[o] for o in owners)
            assert Counter(owners) == Counter({i: 2 for i in range(4) if b.mask[i]})
        seen.update(ids_of(batches))
    assert len(set(counts)) == 1
    assert sorted(seen) == sorted(f"s{i}" for i in range(11)) and max(seen.values()) == 1


def test_eval_captions_decode_back_to_text(dataset):
    cfg = make_cfg(dataset)
    vocab = build_vocabulary(cfg)
    batch = next(iter(build_loader(cfg, vocab, split="val", mode="eval")))
    row = batch.ids.index("s0")
    texts = [vocab.decode(batch.all_captions[i, : batch.all_lengths[i]].tolist())
             for i in range(len(batch.caption_owner)) if batch.caption_owner[i] == row]
    assert texts == captions_for(0)


def test_features_take_the_same_path(tmp_path):
    write_split(tmp_path, "train", 10, shard_size=3, modality="features", feature_dim=8)
    cfg = make_cfg(tmp_path, batch_size=5)
    vocab = build_vocabulary(cfg)
    batches = run_epoch(build_loader(cfg, vocab, split="train", mode="train"), 0)
    assert batches[0].images is None and batches[0].features.shape == (5, 8)
    for b in batches:
        for row, sid in zip(b.features, b.ids):
            assert torch.all(row == float(sid[1:]))


def write_img2dataset_shard(path, start, count):
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + count):
            key = f"{i:09d}"
            add_member(tar, f"{key}.jpg", image_bytes(i, fmt="JPEG"))
            add_member(tar, f"{key}.txt", f"a photo of thing {i}".encode())
            add_member(tar, f"{key}.json", json.dumps({"key": key, "url": "u", "status": "success"}).encode())
    (path.with_suffix(".parquet")).write_bytes(b"not read")


def test_img2dataset_shards_are_read_without_rebuilding(tmp_path):
    for s in range(3):
        write_img2dataset_shard(tmp_path / f"{s:05d}.tar", s * 7, 7)
    cfg = make_cfg(tmp_path, train_split=".", batch_size=3)
    vocab = build_vocabulary(cfg)
    assert "photo" in vocab.stoi
    batches = run_epoch(build_loader(cfg, vocab, split=".", mode="train"), 0)
    assert len(batches) == 7 and all(b.images.shape == (3, 3, 16, 16) for b in batches)
    assert len({k for b in batches for k in b.keys}) == 21


def test_resampled_mode_has_a_fixed_length(dataset):
    cfg = make_cfg(dataset, resampled=True, samples_per_epoch=40, num_workers=2)
    vocab = build_vocabulary(cfg)
    loader = build_loader(cfg, vocab, split="train", mode="train", rank=1, world_size=2)
    assert len(run_epoch(loader, 0)) == len(loader) == 5


def test_missing_split_names_what_exists(dataset):
    cfg = make_cfg(dataset)
    vocab = build_vocabulary(cfg)
    with pytest.raises(DataError, match=r"no shards for split 'test'.*splits with shards: train, val"):
        build_loader(cfg, vocab, split="test", mode="eval")


def test_batch_larger_than_data_is_refused_before_training(dataset):
    cfg = make_cfg(dataset, batch_size=32)
    vocab = build_vocabulary(cfg)
    with pytest.raises(DataError, match="fewer than one batch per rank.*data.batch_size"):
        build_loader(cfg, vocab, split="train", mode="train", world_size=2)


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 0, "batch_size: must be >= 1"),
    ("max_bad_fraction", 2.0, "max_bad_fraction: must be in"),
    ("resampled", True, "samples_per_epoch: is required"),
    ("num_workers", "two", "num_workers: expected int"),
    ("bogus", 1, "bogus: unknown field"),
])
def test_bad_data_config_names_the_field(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(tmp_path, **{field: value})


def test_normalised_batch_matches_manual(dataset):
    from cmr.data.transforms import normalize

    cfg = make_cfg(dataset)
    vocab = build_vocabulary(cfg)
    batch = next(iter(build_loader(cfg, vocab, split="val", mode="eval")))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = normalize(batch.images, mean, std)
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(x, (batch.images.float() / 255 - mean) / std, atol=1e-6)
    assert np.isfinite(x.numpy()).all()


def test_an_eval_loader_gives_the_whole_split_on_every_pass(dataset):
    cfg = make_cfg(dataset, num_workers=2)
    loader = build_loader(cfg, build_vocabulary(cfg), split="val", mode="eval")
    first, second = ids_of(list(loader)), ids_of(list(loader))
    assert first == second and len(first) == 11


def test_persistent_workers_follow_the_epoch_and_resume_settings(dataset):
    """One loader over several epochs (workers kept alive) = a fresh loader per epoch."""
    cfg = make_cfg(dataset, num_workers=2)
    vocab = build_vocabulary(cfg)
    kept = build_loader(cfg, vocab, split="train", mode="train")
    for epoch in (0, 1, 2):
        fresh = build_loader(cfg, vocab, split="train", mode="train")
        assert ids_of(run_epoch(kept, epoch)) == ids_of(run_epoch(fresh, epoch))
    kept.seek(5, 3)
    fresh = build_loader(cfg, vocab, split="train", mode="train")
    fresh.seek(5, 3)
    assert ids_of(list(kept)) == ids_of(list(fresh))


def contents(batches):
    return [(b.keys, b.images, b.captions, b.lengths, b.epoch, b.worker, b.window) for b in batches]


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(contents(got), contents(expected)):
        assert g[0] == e[0] and g[4:] == e[4:]
        assert all(torch.equal(x, y) for x, y in zip(g[1:4], e[1:4]))


def test_reading_the_next_epoch_ahead_changes_no_batch(dataset):
    """prefetch_next_epoch: the same batches, bit for bit, whole epochs and after a seek that
    throws away the epoch read ahead."""
    on = make_cfg(dataset, num_workers=2)
    off = make_cfg(dataset, num_workers=2, prefetch_next_epoch=False)
    vocab = build_vocabulary(on)
    ahead = build_loader(on, vocab, split="train", mode="train")
    plain = build_loader(off, vocab, split="train", mode="train")
    assert len(ahead._lanes) == 2 and len(plain._lanes) == 1
    for epoch in (0, 1):
        assert_same_batches(run_epoch(ahead, epoch), run_epoch(plain, epoch))
    assert ahead._ahead[0] == 2  # epoch 2 was started while epoch 1 ran
    for loader in (ahead, plain):
        loader.seek(2, 3)
    assert_same_batches(list(ahead), list(plain))  # the read-ahead epoch 2 was not used
    assert_same_batches(run_epoch(ahead, 3), run_epoch(plain, 3))


def test_the_next_epoch_is_read_while_this_one_runs(dataset):
    cfg = make_cfg(dataset, num_workers=2)
    loader = build_loader(cfg, build_vocabulary(cfg), split="train", mode="train")
    loader.end_epoch = 2
    loader.set_epoch(0)
    batches = iter(loader)
    next(batches)
    epoch, started = loader._ahead
    assert epoch == 1
    # Epoch 1's workers deliver batches into their queue before anyone asks for them.
    deadline = time.monotonic() + 60
    while started._data_queue.qsize() == 0:
        assert time.monotonic() < deadline, "the next epoch's workers produced nothing"
        time.sleep(0.05)
    list(batches)
    assert run_epoch(loader, 1)[0].epoch == 1
    assert loader._ahead is None  # nothing is read past end_epoch
