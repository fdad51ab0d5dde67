"""Shards in an object store: S3 on moto's server (127.0.0.1), read through s3fs by the same
loader as a local directory; an endpoint that goes away mid-epoch or mid-object loses nothing."""

from __future__ import annotations

import json
import logging
import tarfile

import pytest

from cmr.data.loader import build_loader, build_vocabulary
from cmr.data.remote import Opener
from cmr.data.source import open_split
from cmr.data.tario import TarMembers
from tests.remote_data import assert_same, epoch_batches, local_reference, make_cfg, picture_tar, write_dataset
from tests.s3_store import s3_env, s3_server, take_s3_server_down, upload_dir
from tests.tiny_data import add_member, image_bytes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("remote_s3"))


@pytest.fixture(scope="module")
def local(dataset):
    """The reference: the same shards read from the local directory."""
    return local_reference(dataset)


@pytest.fixture(scope="module")
def s3_endpoint(dataset):
    """moto's S3 server, with the dataset in ``s3://bucket/tiny``."""
    with s3_server() as endpoint:
        upload_dir(endpoint, "bucket", dataset, prefix="tiny")
        yield endpoint


@pytest.fixture()
def s3(s3_endpoint, monkeypatch):
    """The endpoint, with the environment under which s3fs reads it set for this test."""
    for name, value in s3_env(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    return s3_endpoint


def test_s3_reads_the_same_batches_as_local(local, s3):
    local_cfg, vocab = local
    cfg = make_cfg("s3://bucket/tiny", num_workers=2)
    assert build_vocabulary(cfg).itos == vocab.itos
    assert_same(epoch_batches(cfg, vocab, 0, rank=1, world=2), epoch_batches(local_cfg, vocab, 0, rank=1, world=2))


def test_an_object_store_stream_starts_at_the_byte_asked_for(dataset, s3):
    """What a retry after a fault opens: the rest of the object, from a ranged read."""
    whole = (dataset / "train" / "shard-000003.tar").read_bytes()
    stream = Opener().open("s3://bucket/tiny/train/shard-000003.tar", start=1536)
    try:
        assert stream.read() == whole[1536:]
    finally:
        stream.close()
    with pytest.raises(ValueError, match="pipe:"):
        Opener(allow_pipe=True).open("pipe:cat x.tar", start=512)


@pytest.fixture()
def s3_alone(s3, monkeypatch):
    """The S3 server, read by a client without botocore's own retries (AWS_MAX_ATTEMPTS=1,
    read when s3fs makes its client): they would outlast a test's outage and leave nothing
    to the reader's retries."""
    import s3fs

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3
    s3fs.S3FileSystem.clear_instance_cache()  # the next test's client retries as usual


def test_an_object_store_that_goes_away_mid_epoch_and_comes_back_loses_nothing(local, s3_alone, caplog):
    """The S3 endpoint stops after the first batch and is back 3 s later: the shards asked for
    meanwhile are retried, and the epoch equals the local one bit for bit."""
    local_cfg, vocab = local
    cfg = make_cfg("s3://bucket/tiny", max_retries=6, retry_backoff_s=0.5)
    loader = build_loader(cfg, vocab, split="train", mode="train", rank=0, world_size=1)
    loader.set_epoch(0)
    batches = iter(loader)
    got = [next(batches)]
    outage = take_s3_server_down(s3_alone, for_s=3)
    try:
        with caplog.at_level(logging.WARNING, logger="cmr.data.tario"):
            got += list(batches)
    finally:
        outage.join()  # the server is back for the next test, whatever happened here
    assert_same(got, epoch_batches(make_cfg(local_cfg.shards), vocab, 0))
    retried = [r.getMessage() for r in caplog.records if "; retry " in r.getMessage()]
    assert retried and all("s3://bucket/tiny/train/shard-" in m for m in retried), caplog.text


def test_an_object_store_cut_mid_object_resumes_after_the_last_member(tmp_path, s3_alone, monkeypatch):
    """s3fs lets botocore's EndpointConnectionError (not an OSError) through once its own
    retries are spent; mid-read it is a transient failure like a reset, and the tar goes on
    at the byte after the last member delivered."""
    import fsspec

    # Blocks of 64 KiB, so the object is fetched in many ranged reads (s3fs's default is 50 MiB).
    monkeypatch.setitem(fsspec.config.conf, "s3", {"default_block_size": 64 * 1024})
    want = picture_tar(tmp_path / "cut.tar", 12, 96)
    upload_dir(s3_alone, "cut", tmp_path)
    members = TarMembers("s3://cut/cut.tar", Opener(retry_backoff_s=0.5, max_retries=6))
    stream = iter(members)
    got = [next(stream) for _ in range(4)]
    outage = take_s3_server_down(s3_alone, for_s=3)
    try:
        got += list(stream)
    finally:
        outage.join()
    assert [(f"{k}.{e}", data) for k, e, data in got] == want
    assert members.failure is None and members.retries >= 1


def test_s3_lists_manifest_less_shards_and_reads_stats(tmp_path, s3):
    for s in range(2):
        with tarfile.open(tmp_path / f"{s:05d}.tar", "w") as tar:
            for i in range(s * 4, s * 4 + 4):
                add_member(tar, f"{i:09d}.jpg", image_bytes(i, fmt="JPEG"))
                add_member(tar, f"{i:09d}.txt", f"thing {i}".encode())
        (tmp_path / f"{s:05d}_stats.json").write_text(json.dumps({"successes": 4}))
    upload_dir(s3, "bucket", tmp_path, prefix="laion")
    shardset = open_split("s3://bucket/laion", ".", Opener())
    assert [str(p) for p in shardset.paths] == ["s3://bucket/laion/00000.tar", "s3://bucket/laion/00001.tar"]
    assert shardset.sizes == (4, 4)
    cfg = make_cfg("s3://bucket/laion", train_split=".", batch_size=2)
    vocab = build_vocabulary(cfg)
    assert len({k for b in epoch_batches(cfg, vocab, 0, split=".") for k in b.keys}) == 8
