"""An S3-compatible server for tests: moto's server mode on 127.0.0.1, read through s3fs.

``s3_server()`` runs moto's S3 server on a free port and yields its endpoint; ``upload_dir``
fills a bucket from a directory; ``s3_env`` gives the variables under which s3fs, boto3 and
``fsspec.open("s3://...")`` (also in child processes) talk to it; ``take_s3_server_down``
stops it for a while and starts it again on the same port, its buckets kept.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

S3_REGION = "us-east-1"


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment under which boto3, s3fs and ``fsspec.open("s3://...")`` use ``endpoint``.

    ``AWS_ENDPOINT_URL`` is read by botocore whenever a client is made, so setting it (e.g. with
    ``monkeypatch.setenv``) works at any time and is inherited by child processes.
    (``FSSPEC_S3_ENDPOINT_URL`` also works, but fsspec reads it only once, when it is imported.)
    """
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_ENDPOINT_URL": endpoint,
    }


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """Run moto's S3 server on 127.0.0.1 and a free port; yield its endpoint, e.g.
    ``http://127.0.0.1:PORT``. It starts empty; moto keeps one store per process, so servers
    running at the same time share their buckets, and starting one empties them all. Not under
    ``python -X dev`` or PYTHONASYNCIODEBUG=1: aiohttp (under s3fs) then rejects the two Server
    headers moto's responses carry."""
    from moto.server import ThreadedMotoServer  # heavy (Flask, ...); only S3 tests pay for it

    logger = logging.getLogger("werkzeug")  # one line per request otherwise
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    _S3_SERVERS[endpoint] = _Running(server)
    try:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))
        yield endpoint
    finally:
        _S3_SERVERS[endpoint].join()  # a restart under way (take_s3_server_down) ends first
        _stop_moto(_S3_SERVERS.pop(endpoint).server)
        _forget_s3fs_clients()


class _Running:
    """The moto server now answering at an endpoint, and the thread restarting it, if any."""

    def __init__(self, server, restart: threading.Thread | None = None):
        self.server, self.restart = server, restart

    def join(self) -> None:
        if self.restart is not None:
            self.restart.join()


# The moto server of each endpoint s3_server() yielded, current across restarts.
_S3_SERVERS: dict[str, _Running] = {}


def _stop_moto(server) -> None:
    server.stop()
    server._server.server_close()  # stop() leaves the listening socket open


def take_s3_server_down(endpoint: str, for_s: float) -> threading.Thread:
    """Stop the S3 server at ``endpoint`` (one ``s3_server()`` yielded) now, and start it again
    on the same port ``for_s`` seconds later, in a thread, which is returned. The buckets are
    kept: moto holds them in this process, and only ``s3_server()`` resets them."""
    from moto.server import ThreadedMotoServer

    running = _S3_SERVERS[endpoint]
    running.join()
    _stop_moto(running.server)
    port = int(endpoint.rsplit(":", 1)[1])

    def restart() -> None:
        time.sleep(for_s)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        running.server = server

    running.restart = threading.Thread(target=restart, name="s3-restart", daemon=True)
    running.restart.start()
    return running.restart


def _forget_s3fs_clients() -> None:
    """s3fs caches one filesystem per set of arguments: ``fsspec.open("s3://...")`` in the next
    test would reuse the client of this server's endpoint, which is gone."""
    with contextlib.suppress(ImportError):
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


def upload_dir(endpoint: str, bucket: str, local_dir: str | Path, prefix: str = "") -> list[str]:
    """Create ``bucket`` (if missing) and upload every file under ``local_dir`` to
    ``prefix/<relative path>``; return the keys, sorted."""
    import boto3

    env = s3_env(endpoint)
    client = boto3.client("s3", endpoint_url=endpoint, region_name=S3_REGION,
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    local_dir = Path(local_dir)
    keys = []
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        key = "/".join(part for part in (prefix.strip("/"), file.relative_to(local_dir).as_posix())
                       if part)
        client.upload_file(str(file), bucket, key)
        keys.append(key)
    return keys
