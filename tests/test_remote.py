"""Shards from anywhere: http(s), brace patterns and pipe:, read by the same loader as a local
directory, with faults on the wire that lose nothing and shift nothing. Object stores (S3 on
moto's server) are in test_remote_s3.py.

Every server is real and listens on 127.0.0.1 only (tests/servers.py)."""

from __future__ import annotations

import base64
import json
import time
import shutil
import tarfile
import threading
from collections import Counter

import psutil
import pytest

from cmr.config import ConfigError
from cmr.data.loader import build_loader, build_vocabulary
from cmr.data.remote import Opener, expand, is_pattern, join, redact, redact_spec
from cmr.data.source import DataError, open_split
from cmr.data.tario import TarMembers, count_tar_samples
from tests.remote_data import (NUM_TRAIN, SHARD, assert_same, epoch_batches, local_reference, make_cfg, picture_tar,
                               write_dataset)
from tests.servers import ShardServer, self_signed_certificate
from tests.tiny_data import add_member, image_bytes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("remote"))


@pytest.fixture(scope="module")
def local(dataset):
    """The reference: the same shards read from the local directory."""
    return local_reference(dataset)


@pytest.fixture()
def server(dataset):
    with ShardServer(dataset) as running:
        yield running


# -- locations -----------------------------------------------------------------------------


def test_locations_are_redacted_expanded_and_joined():
    assert redact("https://me:secret@host:8443/d/x.tar?X-Amz-Signature=abc") == "https://host:8443/d/x.tar?…"
    assert redact("pipe:aws s3 cp s3://b/x.tar -") == "pipe:aws …"
    assert redact("/data/coco") == "/data/coco"
    assert redact_spec({"train": ["s3://b/a.tar?sig=1"], "val": "https://u:p@h/{0..1}.tar"}) == \
        {"train": ["s3://b/a.tar?…"], "val": "https://h/{0..1}.tar"}
    assert expand("https://h/cc3m/{00000..00002}.tar::s3://b/x.tar") == [
        "https://h/cc3m/00000.tar", "https://h/cc3m/00001.tar", "https://h/cc3m/00002.tar", "s3://b/x.tar"]
    assert is_pattern("s3://b/laion/{000000..041455}.tar") and is_pattern(["a.tar"])
    assert is_pattern("https://h/one.tar") and not is_pattern("https://h/data/coco")
    assert join("https://h/data?token=t", "train") == "https://h/data/train?token=t"


def test_pipe_needs_allow_pipe_and_the_error_names_the_field():
    with pytest.raises(ConfigError, match=r"^allow_pipe: pipe:cat … runs a shell command"):
        make_cfg("pipe:cat /x/shard-{0..3}.tar")
    with pytest.raises(DataError, match="data.allow_pipe"):
        open_split("pipe:cat /x/a.tar", "train")


def test_a_bad_url_is_one_line_not_a_traceback(server):
    cfg = make_cfg(f"{server.url}/nothing-here")
    with pytest.raises(DataError) as err:
        build_vocabulary(cfg)
    message = str(err.value)
    assert "\n" not in message and "manifest.json" in message and "brace pattern" in message
    with pytest.raises(DataError, match="no such host|cannot read|host not resolved|refused"):
        build_vocabulary(make_cfg("http://127.0.0.1:9/data", max_retries=0))


# -- http(s) -------------------------------------------------------------------------------


def test_http_gives_the_same_batches_as_the_local_directory(local, server):
    local_cfg, vocab = local
    cfg = make_cfg(server.url, num_workers=2)
    assert build_vocabulary(cfg).itos == vocab.itos
    for epoch in range(2):
        seen = Counter()
        for rank in range(2):
            got = epoch_batches(cfg, vocab, epoch, rank=rank, world=2)
            assert_same(got, epoch_batches(local_cfg, vocab, epoch, rank=rank, world=2))
            seen.update(k for b in got for k, m in zip(b.keys, b.mask.tolist()) if m)
        assert max(seen.values()) == 1 and len(seen) == NUM_TRAIN - NUM_TRAIN % 8
    got = epoch_batches(cfg, vocab, 0, split="val", mode="eval")
    assert_same(got, epoch_batches(local_cfg, vocab, 0, split="val", mode="eval"))


def tar_gets(server) -> list[str]:
    return [path for method, path in server.requests if method == "GET" and path.endswith(".tar")]


@pytest.mark.parametrize("ahead", [True, False])
def test_the_next_shard_is_opened_while_the_current_one_is_read(local, server, ahead):
    """data.open_ahead: once a shard's first sample is in, the next shard's transfer starts
    (its connection and first bytes are not waited for); off, each shard is asked for only when
    reached. Either way every shard is read once and no transfer is left behind."""
    cfg = make_cfg(server.url, open_ahead=ahead, shuffle_buffer=0)  # batches of 4 from shards of 6
    loader = build_loader(cfg, local[1], split="train", mode="train")
    loader.set_epoch(0)
    batches = iter(loader)
    before = len(tar_gets(server))
    next(batches)  # within the first shard
    deadline = time.time() + (10 if ahead else 1)
    while len(tar_gets(server)) - before < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert len(tar_gets(server)) - before == (2 if ahead else 1)
    rest = list(batches)
    assert sum(b.size for b in rest) + 4 == NUM_TRAIN - NUM_TRAIN % 4
    requested = tar_gets(server)[before:]
    assert sorted(requested) == sorted(set(requested)) and len(requested) == -(-NUM_TRAIN // SHARD)
    deadline = time.time() + 5  # an opening ahead that was not taken closes when it ends
    while (open_connections(server) or opening_ahead()) and time.time() < deadline:
        time.sleep(0.05)
    assert not open_connections(server) and not opening_ahead()


def open_connections(server):
    """This process's TCP connections to ``server`` still open."""
    return [c for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port == server.port and c.status == psutil.CONN_ESTABLISHED]


def opening_ahead():
    return [t for t in threading.enumerate() if t.name == "cmr-open-ahead"]


def test_a_mid_epoch_resume_over_http_gives_exactly_the_rest(local, server):
    local_cfg, vocab = local
    cfg = make_cfg(server.url, num_workers=2)
    full = epoch_batches(local_cfg, vocab, 1)
    first = build_loader(cfg, vocab, split="train", mode="train")
    first.set_epoch(1)
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == 3:
            break
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_loader(cfg, vocab, split="train", mode="train")
    resumed.load_state_dict(state)
    assert_same(head + list(resumed), full)


def test_faults_on_the_wire_lose_nothing_and_shift_nothing(local, server):
    """Connections cut mid-tar, a stall, 503s and a server restart: retried, resumed at the
    sample the stream was at, and the epoch equals the local one bit for bit."""
    local_cfg, vocab = local
    drops = [server.faults.drop_after(3000, path="train/shard-000001.tar", times=2),
             server.faults.drop_after(9000, path="train/shard-000004.tar", reset=True)]
    stall = server.faults.stall(3.0, after_bytes=2000, path="train/shard-000002.tar")
    unavailable = server.faults.status(503, path="train/*.tar", p=0.3, seed=1)
    cfg = make_cfg(server.url, num_workers=2, max_retries=8, io_timeout_s=1)
    got = epoch_batches(cfg, vocab, 0)
    assert_same(got, epoch_batches(local_cfg, vocab, 0))
    assert [d.applied for d in drops] == [2, 1] and stall.applied == 1 and unavailable.applied > 0


def test_a_server_stopped_and_restarted_mid_epoch_loses_nothing(local, server):
    """Two workers read over http; while shard 4 is being sent the server goes away, and 2 s
    later it is back on the same port: the cut transfer is asked for again and the epoch
    equals the local one bit for bit."""
    local_cfg, vocab = local
    path = "/train/shard-000004.tar"
    # Socket buffers would take a small shard whole: hold it back, so that the stop cuts it.
    server.faults.stall(60, after_bytes=2000, path=path)

    def outage() -> None:
        deadline = time.monotonic() + 60
        while path not in tar_gets(server) and time.monotonic() < deadline:
            time.sleep(0.01)
        server.stop()
        time.sleep(2.0)
        server.start()

    restart = threading.Thread(target=outage, daemon=True)
    restart.start()
    try:
        got = epoch_batches(make_cfg(server.url, num_workers=2, max_retries=6, retry_backoff_s=0.5), vocab, 0)
    finally:
        restart.join()
    assert_same(got, epoch_batches(local_cfg, vocab, 0))
    assert tar_gets(server).count(path) >= 2  # cut by the stop, asked for again after the restart


def test_a_server_restart_mid_shard_is_survived(tmp_path):
    """The server goes away mid-transfer and comes back: the shard is reopened and continues
    after the last member delivered."""
    names = [name for name, _ in picture_tar(tmp_path / "big.tar", 20, 256)]
    with ShardServer(tmp_path) as server:
        # Socket buffers on loopback hold megabytes: hold the rest back so that stop() cuts it.
        server.faults.stall(60, after_bytes=1_000_000, path="big.tar")
        members = TarMembers(f"{server.url}/big.tar", Opener(retry_backoff_s=0.5, max_retries=5))
        stream = iter(members)
        first = [next(stream) for _ in range(3)]
        server.stop()  # cuts the transfer; the next attempts are refused until it is back
        server.start()
        rest = list(stream)
        assert [m for m, p in server.requests if p == "/big.tar"] == ["GET", "GET"]
    assert [f"{k}.{e}" for k, e, _ in first + rest] == names
    assert members.failure is None and members.retries == 1


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "server-ignores-range"])
def test_a_cut_transfer_resumes_at_the_byte_after_the_last_member(tmp_path, ranges):
    """After a cut, the retry asks for the rest only (Range: the byte after the last member
    delivered, a tar header boundary). A server that ignores Range sends the whole tar again:
    that shows in its first member, and the reader skips what it delivered before."""
    want = picture_tar(tmp_path / "big.tar", 12, 64)
    with tarfile.open(tmp_path / "big.tar") as tar:
        boundaries = {m.offset for m in tar.getmembers()}
    size = (tmp_path / "big.tar").stat().st_size
    with ShardServer(tmp_path, ranges=ranges) as server:
        cut = size // 2
        server.faults.drop_after(cut, path="big.tar")
        members = TarMembers(f"{server.url}/big.tar", Opener(retry_backoff_s=0.05))
        got = [(f"{k}.{e}", data) for k, e, data in members]
        assert got == want and members.failure is None and members.retries == 1
        (_, first), (_, retry) = server.range_requests
    assert first is None
    start = int(retry.removeprefix("bytes=").removesuffix("-"))
    assert start in boundaries and 0 < start <= cut, (start, cut)
    assert start > cut - 2 * 64 * 64 * 3  # at most a member or two before the cut is fetched again


def test_a_shard_that_never_answers_is_counted_not_fatal(local, server):
    local_cfg, vocab = local
    server.faults.status(503, path="train/shard-000002.tar", times=None)
    cfg = make_cfg(server.url, num_workers=2, max_retries=2, max_bad_fraction=1.0)
    got = epoch_batches(cfg, vocab, 0)
    want = epoch_batches(local_cfg, vocab, 0)
    skipped = sum((Counter(b.skipped) for b in got), Counter())
    assert skipped == Counter(unreachable_shard=SHARD), skipped
    lost = {f"shard-000002.tar/{i:08d}" for i in range(2 * SHARD, 3 * SHARD)}
    assert [k for b in got for k in b.keys if k not in lost] == [k for b in want for k in b.keys if k not in lost]


def test_too_many_unreachable_samples_stop_the_run_with_the_numbers(local, server):
    local_cfg, vocab = local
    server.faults.status(503, path="train/shard-00000[0-3].tar", times=None)
    cfg = make_cfg(server.url, max_retries=0, max_bad_fraction=0.1, min_samples_for_bad_check=8)
    with pytest.raises(DataError, match=r"unreachable_shard=\d+.*data.max_bad_fraction=0.1"):
        epoch_batches(cfg, vocab, 0)


def test_brace_patterns_without_a_manifest_count_once_and_cache(tmp_path, local, monkeypatch):
    """img2dataset-style tars behind a plain web server: counted by one pass the first time,
    from the local cache afterwards (keyed by URL, size and ETag: a changed shard is recounted)."""
    local_cfg, vocab = local
    monkeypatch.setenv("CMR_CACHE", str(tmp_path / "cache"))
    served = tmp_path / "served"
    shutil.copytree(local_cfg.shards + "/train", served)
    (served / "manifest.json").unlink()
    with ShardServer(served) as server:
        pattern = f"{server.url}/shard-{{000000..000007}}.tar"
        first = open_split(pattern, "train", Opener())
        assert first.sizes == (6, 6, 6, 6, 6, 6, 6, 3)
        gets = [p for m, p in server.requests if m == "GET"]
        again = open_split(pattern, "train", Opener())
        assert again.sizes == first.sizes
        new_gets = [p for m, p in server.requests if m == "GET"][len(gets):]
        assert [p for p in new_gets if p.endswith(".tar")] == ["/shard-000000.tar"]  # the modality probe
        with tarfile.open(served / "shard-000007.tar", "a") as tar:
            add_member(tar, "99999999.png", image_bytes(99))
            add_member(tar, "99999999.json", json.dumps({"captions": ["one more"]}).encode())
        assert open_split(pattern, "train", Opener()).sizes[-1] == 4
        cfg = make_cfg({"train": pattern, "val": local_cfg.shards + "/val"})
        assert [k for b in epoch_batches(cfg, vocab, 0) for k in b.keys][:4]


def test_a_total_sample_count_is_refused_with_what_to_give_instead():
    """open_clip users give a total (--train-num-samples); the exactly-once plan needs each
    shard's count, so data.num_samples says what to write instead of "unknown field"."""
    with pytest.raises(ConfigError, match=r"^num_samples: not a field: .*data.shard_sizes.*data.samples_per_epoch"):
        make_cfg("https://h/{0..9}.tar", num_samples=1000)


def test_img2dataset_stats_files_count_without_reading_a_tar(tmp_path):
    for s in range(3):
        with tarfile.open(tmp_path / f"{s:05d}.tar", "w") as tar:
            for i in range(s * 5, s * 5 + 5):
                add_member(tar, f"{i:09d}.jpg", image_bytes(i, fmt="JPEG"))
                add_member(tar, f"{i:09d}.txt", f"a photo of thing {i}".encode())
        (tmp_path / f"{s:05d}_stats.json").write_text(json.dumps({"successes": 5, "count": 7}))
    with ShardServer(tmp_path) as server:
        shardset = open_split(f"{server.url}/{{00000..00002}}.tar", "train", Opener())
        assert shardset.sizes == (5, 5, 5)
        tars_read = [p for m, p in server.requests if m == "GET" and p.endswith(".tar")]
        assert tars_read == ["/00000.tar"]  # the modality of the first sample only


def test_pipe_commands_read_shards_when_allowed(local):
    local_cfg, vocab = local
    pattern = f"pipe:cat {local_cfg.shards}/train/shard-{{000000..000007}}.tar"
    cfg = make_cfg({"train": pattern}, allow_pipe=True)
    assert_same(epoch_batches(cfg, vocab, 0), epoch_batches(make_cfg(local_cfg.shards), vocab, 0))
    assert count_tar_samples(f"pipe:cat {local_cfg.shards}/train/shard-000007.tar", Opener(allow_pipe=True)) == 3


# -- the shards CLI on remote datasets -----------------------------------------------------


def test_inspect_and_validate_read_a_dataset_over_http(dataset, capsys):
    from shards.__main__ import main

    with ShardServer(dataset) as server:
        capsys.readouterr()
        assert main(["inspect", server.url]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["samples"] == NUM_TRAIN + 11 and set(summary["splits"]) == {"train", "val"}
        assert main(["validate", server.url, "--decode"]) == 0
        ok = f"ok: {NUM_TRAIN + 11} samples in 2 splits (train, val), all decoded"
        assert capsys.readouterr().out.strip().endswith(ok)
        assert main(["build", "emoji", "--out", f"{server.url}/new"]) == 2
    assert "builders write to a local directory" in capsys.readouterr().err


def test_validate_over_http_names_each_problem(dataset, tmp_path, capsys):
    from shards.__main__ import main

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    with open(copy / "train" / "shard-000003.tar", "r+b") as f:
        f.seek(2000)
        byte = f.read(1)
        f.seek(2000)
        f.write(bytes([byte[0] ^ 0xFF]))
    (copy / "val" / "shard-000001.tar").unlink()
    with ShardServer(copy) as server:
        server.faults.drop_after(1000, path="train/shard-000005.tar")  # transient: retried
        capsys.readouterr()
        assert main(["validate", server.url]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:-1] == ["train/shard-000003.tar: sha256 does not match the manifest (file changed)",
                        f"val/shard-000001.tar: missing ({server.url}/val/shard-000001.tar: not found (HTTP 404))"]
    assert out[-1].startswith("FAILED: 2 problem(s)")


def test_credentials_in_a_url_are_sent_as_basic_auth(server):
    """``https://user:password@host/…`` works as with curl: the credentials (percent-decoded)
    go in an Authorization header, not in the request line."""
    shard = f"{server.url}/train/shard-000000.tar".replace("http://", "http://me:p%40ss@")
    assert count_tar_samples(shard, Opener()) == SHARD
    assert Opener().stamp(shard)  # the HEAD request too
    assert server.authorizations == ["Basic " + base64.b64encode(b"me:p@ss").decode()] * 2
    assert count_tar_samples(f"{server.url}/train/shard-000000.tar", Opener()) == SHARD
    assert server.authorizations[-1] is None


def test_credentials_do_not_follow_a_redirect_to_another_host(dataset, server):
    """A redirect is followed (as curl --location does), but the credentials stay with the
    host they were given for."""
    with ShardServer(dataset) as other:
        elsewhere = f"http://localhost:{other.port}/train/shard-000001.tar"  # another host name
        server.faults.redirect(elsewhere, path="train/shard-000000.tar")
        shard = f"{server.url}/train/shard-000000.tar".replace("http://", "http://me:secret@")
        assert count_tar_samples(shard, Opener()) == SHARD
        assert server.authorizations == ["Basic " + base64.b64encode(b"me:secret").decode()]
        assert other.requests == [("GET", "/train/shard-000001.tar")] and other.authorizations == [None]


def test_https_checks_the_certificate_and_reads_once_it_is_trusted(dataset, tmp_path, monkeypatch):
    """A server whose certificate no system trusts: one line naming it, not retried (another
    try cannot cure it); trusted through SSL_CERT_FILE, as with curl, the shard reads."""
    cert, key = self_signed_certificate(tmp_path)
    with ShardServer(dataset, tls=(cert, key)) as server:
        shard = f"{server.url}/train/shard-000000.tar"
        members = TarMembers(shard, Opener(retry_backoff_s=0.01))
        assert list(members) == [] and members.failure == "unreachable_shard"
        assert members.message.startswith(f"{shard}: TLS certificate not trusted (") and members.retries == 0
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert count_tar_samples(shard, Opener()) == SHARD
        assert Opener().stamp(shard)


def test_no_secret_reaches_a_log_line_or_an_error(local, server, caplog):
    local_cfg, vocab = local
    secret = "X-Amz-Signature=0123secret"
    pattern = f"http://user:hunter2@127.0.0.1:{server.port}/train/shard-{{000000..000007}}.tar?{secret}"
    server.faults.status(503, path="train/shard-000001.tar", times=None)
    server.faults.drop_after(2000, path="train/shard-000002.tar")
    cfg = make_cfg({"train": pattern}, num_workers=0, max_retries=1, max_bad_fraction=0.05,
                   min_samples_for_bad_check=4, shard_sizes=[6] * 7 + [3])
    with caplog.at_level("WARNING"), pytest.raises(DataError) as err:
        epoch_batches(cfg, vocab, 0)
    shown = caplog.text + str(err.value)
    assert "unreachable_shard" in shown and "shard-000001.tar?…" in shown  # the lines are there,
    assert "0123secret" not in shown and "hunter2" not in shown  # without the secrets
