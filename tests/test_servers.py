"""The test servers do what the network-loading tests rely on: real bytes, real faults."""

from __future__ import annotations

import http.client
import random
import subprocess
import threading
import time
import urllib.error
import urllib.request

import fsspec
import pytest
import s3fs

from tests.s3_store import s3_env, s3_server, upload_dir
from tests.servers import ShardServer

SHARD = "train/shard-000000.tar"
SHARD_BYTES = random.Random(0).randbytes(300_000)


@pytest.fixture
def shard_dir(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / SHARD).write_bytes(SHARD_BYTES)
    (tmp_path / "train" / "manifest.json").write_text('{"num_shards": 1}\n')
    return tmp_path


@pytest.fixture
def server(shard_dir):
    with ShardServer(shard_dir) as server:
        yield server


def curl(url: str, *args: str) -> subprocess.CompletedProcess:
    """curl as the loader runs it: fail on HTTP errors, body to stdout."""
    return subprocess.run(["curl", "-s", "-f", *args, url], capture_output=True, timeout=30)


def get(url: str, method: str = "GET", headers: dict[str, str] | None = None):
    request = urllib.request.Request(url, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


def test_get_serves_the_file_bytes_to_urllib_and_curl(server):
    url = f"{server.url}/{SHARD}"
    status, headers, body = get(url)
    assert (status, body) == (200, SHARD_BYTES)
    assert headers["Content-Type"] == "application/x-tar"
    result = curl(url)
    assert (result.returncode, result.stdout) == (0, SHARD_BYTES)
    assert server.requests == [("GET", f"/{SHARD}")] * 2


def test_missing_files_and_paths_outside_the_root_are_404(server, shard_dir):
    (shard_dir.parent / "secret.txt").write_text("not served")
    with pytest.raises(urllib.error.HTTPError) as error:
        get(f"{server.url}/train/shard-000099.tar")
    assert error.value.code == 404
    error.value.close()
    assert curl(f"{server.url}/../secret.txt", "--path-as-is").returncode == 22  # HTTP error
    assert curl(f"{server.url}/train").returncode == 22  # no directory listings


def test_head_gives_length_etag_and_last_modified_that_follow_the_file(server, shard_dir):
    status, headers, body = get(f"{server.url}/{SHARD}", method="HEAD")
    assert (status, body) == (200, b"")
    assert int(headers["Content-Length"]) == len(SHARD_BYTES)
    assert headers["Last-Modified"].endswith(" GMT")
    (shard_dir / SHARD).write_bytes(SHARD_BYTES[:-1])
    _, changed, _ = get(f"{server.url}/{SHARD}", method="HEAD")
    assert int(changed["Content-Length"]) == len(SHARD_BYTES) - 1
    assert changed["ETag"] != headers["ETag"]


def test_range_requests_get_the_asked_bytes(server):
    url = f"{server.url}/{SHARD}"
    status, headers, body = get(url, headers={"Range": "bytes=100-199"})
    assert (status, body) == (206, SHARD_BYTES[100:200])
    assert headers["Content-Range"] == f"bytes 100-199/{len(SHARD_BYTES)}"
    assert get(url, headers={"Range": "bytes=-10"})[2] == SHARD_BYTES[-10:]
    assert curl(url, "-r", "299990-").stdout == SHARD_BYTES[299_990:]


def test_drop_after_cuts_the_first_k_gets_then_serves_the_whole_file(server):
    url = f"{server.url}/{SHARD}"
    rule = server.faults.drop_after(10_000, path="*.tar", times=2)
    assert get(url, method="HEAD")[0] == 200  # HEAD has no body to cut: not counted
    result = curl(url)
    assert result.returncode == 18  # CURLE_PARTIAL_FILE: headers promised more than came
    assert result.stdout == SHARD_BYTES[:10_000]
    with pytest.raises(http.client.IncompleteRead):
        get(url)
    assert rule.applied == 2
    assert get(url)[2] == SHARD_BYTES
    assert curl(url).stdout == SHARD_BYTES


def test_drop_after_with_reset_is_a_connection_reset(server):
    server.faults.drop_after(10_000, times=1, reset=True)
    result = curl(f"{server.url}/{SHARD}")
    assert result.returncode == 56  # CURLE_RECV_ERROR: connection reset by peer
    assert curl(f"{server.url}/{SHARD}").stdout == SHARD_BYTES


def test_status_answers_the_code_k_times_then_the_file(server):
    url = f"{server.url}/{SHARD}"
    server.faults.status(503, path=SHARD, times=2)
    for _ in range(2):
        with pytest.raises(urllib.error.HTTPError) as error:
            get(url)
        assert error.value.code == 503
        error.value.close()
    assert get(url)[2] == SHARD_BYTES


def test_status_forever_and_only_on_matching_paths(server):
    server.faults.status(503, path="*.tar", times=None)
    assert [curl(f"{server.url}/{SHARD}").returncode for _ in range(5)] == [22] * 5
    assert get(f"{server.url}/train/manifest.json")[0] == 200
    server.faults.clear()
    assert curl(f"{server.url}/{SHARD}").returncode == 0


def test_probability_faults_repeat_with_the_seed(shard_dir):
    def pattern(seed: int) -> list[int]:
        with ShardServer(shard_dir) as server:
            server.faults.status(503, path="*.tar", p=0.3, seed=seed)
            return [curl(f"{server.url}/{SHARD}").returncode for _ in range(20)]

    first = pattern(seed=0)
    assert first == pattern(seed=0)
    assert 0 < first.count(22) < 20 and set(first) == {0, 22}
    assert first != pattern(seed=1)


def test_stall_holds_the_body_then_sends_the_rest(server):
    url = f"{server.url}/{SHARD}"
    server.faults.stall(5.0, after_bytes=1000, times=1)
    result = curl(url, "--max-time", "0.5")
    assert result.returncode == 28  # CURLE_OPERATION_TIMEDOUT
    assert result.stdout == SHARD_BYTES[:1000]
    server.faults.stall(0.5, after_bytes=1000, times=1)
    start = time.monotonic()
    assert curl(url).stdout == SHARD_BYTES
    assert time.monotonic() - start >= 0.5


def test_stall_before_the_headers_sends_nothing(server):
    server.faults.stall(5.0, after_bytes=None, times=1)
    result = curl(f"{server.url}/{SHARD}", "--max-time", "0.5", "-w", "%{http_code}")
    assert (result.returncode, result.stdout) == (28, b"000")  # not even a status line


def test_stop_refuses_connections_and_start_serves_on_the_same_port(server):
    url, port = f"{server.url}/{SHARD}", server.port
    server.stop()
    with pytest.raises(urllib.error.URLError) as error:
        get(url)
    assert isinstance(error.value.reason, ConnectionRefusedError)
    assert curl(url).returncode == 7  # CURLE_COULDNT_CONNECT
    server.start()
    assert server.port == port
    assert get(url)[2] == SHARD_BYTES


def test_stop_cuts_a_transfer_in_flight(server):
    server.faults.stall(30.0, after_bytes=1000, times=1)
    threading.Timer(0.3, server.stop).start()
    start = time.monotonic()
    result = curl(f"{server.url}/{SHARD}")
    assert result.returncode == 18 and result.stdout == SHARD_BYTES[:1000]
    assert time.monotonic() - start < 5


def test_stop_closes_kept_alive_connections(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("GET", f"/{SHARD}")
    assert connection.getresponse().read() == SHARD_BYTES
    server.stop()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        connection.request("GET", f"/{SHARD}")
        connection.getresponse()
    connection.close()
    assert server.requests == [("GET", f"/{SHARD}")]


@pytest.fixture
def s3_endpoint():
    with s3_server() as endpoint:
        yield endpoint


def test_moto_serves_an_uploaded_dir_to_s3fs(s3_endpoint, shard_dir):
    keys = upload_dir(s3_endpoint, "shards", shard_dir, prefix="emoji")
    assert keys == ["emoji/train/manifest.json", f"emoji/{SHARD}"]
    fs = s3fs.S3FileSystem(key="testing", secret="testing",
                           client_kwargs={"endpoint_url": s3_endpoint, "region_name": "us-east-1"})
    assert fs.cat(f"shards/emoji/{SHARD}") == SHARD_BYTES
    assert fs.ls("shards/emoji/train", detail=False) == [
        "shards/emoji/train/manifest.json", f"shards/emoji/{SHARD}"]


def test_s3_env_lets_fsspec_open_read_from_moto(s3_endpoint, shard_dir, monkeypatch):
    upload_dir(s3_endpoint, "plain", shard_dir)
    for name, value in s3_env(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    with fsspec.open(f"s3://plain/{SHARD}", "rb") as f:
        assert f.read() == SHARD_BYTES


def test_each_s3_server_starts_empty_and_fsspec_follows_it(shard_dir, monkeypatch):
    for bucket in ("first", "second"):
        with s3_server() as endpoint:
            for name, value in s3_env(endpoint).items():
                monkeypatch.setenv(name, value)
            assert not fsspec.filesystem("s3").exists("first")
            upload_dir(endpoint, bucket, shard_dir)
            with fsspec.open(f"s3://{bucket}/{SHARD}", "rb") as f:
                assert f.read() == SHARD_BYTES
