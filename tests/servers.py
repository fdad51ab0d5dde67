"""Real servers for tests of reading shards over the network: HTTP with injected faults, and S3.

``ShardServer`` serves a directory over HTTP/1.1 (GET, HEAD, single byte ranges, ETag,
Last-Modified, 404) from a thread on 127.0.0.1, and can be stopped and started again on the
same port. ``ranges=False`` makes it a server that ignores Range (the whole file, 200), as
``python -m http.server`` does; ``range_requests`` lists each GET's Range header, and
``authorizations`` each request's Authorization header. ``tls=self_signed_certificate(folder)``
serves https with a certificate no system trusts. Its ``faults`` spoil chosen responses, and
may be changed while it runs::

    with ShardServer(shard_dir) as server:
        url = f"{server.url}/train/shard-000000.tar"
        server.faults.drop_after(4096, path="*.tar", times=2)  # first 2 GETs: cut after 4 KiB
        server.faults.status(503, path="train/manifest.json")  # the next request: 503
        server.faults.stall(5.0, after_bytes=0, path="*-000003.tar")  # headers, then 5 s silence
        server.faults.status(503, path="*.tar", p=0.3, seed=0)  # ~30% of tar requests, forever
        server.faults.redirect("http://localhost:8000/x.tar", path="*-000004.tar")  # a 302
        ...
        server.stop()                   # in-flight transfers are cut, new ones refused
        server.start()                  # same port, same url
        assert ("GET", "/train/shard-000000.tar") in server.requests

Rules are tried in the order they were added; a request gets at most the first rule that
matches its path (``fnmatch``, case-sensitive; ``*`` also matches ``/``; a leading ``/`` is
ignored on both sides) and still has uses left. ``times`` is how many responses a rule spoils
(``None``: no limit); it defaults to 1, and to no limit when a probability ``p`` is given. Each
rule draws from its own ``random.Random(seed)``, so a test sees the same faults every run.
Body faults (``drop_after``, ``stall`` with ``after_bytes``) apply to GET only; ``status`` and
a header stall (``after_bytes=None``) to every method.

An S3-compatible server (moto's) is in ``tests/s3_store.py``.
"""

from __future__ import annotations

import contextlib
import email.utils
import fnmatch
import mimetypes
import random
import re
import socket
import ssl
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHUNK = 64 * 1024
_UNLIMITED_IF_P = object()  # ``times`` default: once, or without limit when ``p`` is given


@dataclass
class Rule:
    """One fault. ``applied`` counts the responses it has spoiled so far."""

    kind: str  # "drop", "stall", "status" or "redirect"
    path: str
    times: int | None
    p: float
    rng: random.Random
    nbytes: int = 0  # drop: body bytes sent before the cut
    reset: bool = False  # drop: RST instead of FIN
    seconds: float = 0.0  # stall
    after_bytes: int | None = 0  # stall: body bytes sent first; None: before the headers
    code: int = 503  # status, redirect
    location: str = ""  # redirect: the Location header
    applied: int = 0

    def applies_to(self, method: str) -> bool:
        body_fault = self.kind == "drop" or (self.kind == "stall" and self.after_bytes is not None)
        return method == "GET" or not body_fault


class Faults:
    """The fault rules of one server; every method is safe to call while it serves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[Rule] = []

    def drop_after(self, nbytes: int, *, path: str = "*", times=_UNLIMITED_IF_P,
                   p: float | None = None, seed: int = 0, reset: bool = False) -> Rule:
        """Send the headers with the full Content-Length and ``nbytes`` of the body, then cut the
        connection: a FIN (curl: exit 18, partial file), or with ``reset`` an RST (curl: 56)."""
        return self._add("drop", path, times, p, seed, nbytes=nbytes, reset=reset)

    def stall(self, seconds: float, *, after_bytes: int | None = 0, path: str = "*",
              times=_UNLIMITED_IF_P, p: float | None = None, seed: int = 0) -> Rule:
        """Send the headers and ``after_bytes`` of the body (``None``: nothing at all), go silent
        for ``seconds`` (cut short by ``stop()``), then send the rest."""
        return self._add("stall", path, times, p, seed, seconds=seconds, after_bytes=after_bytes)

    def status(self, code: int, *, path: str = "*", times=_UNLIMITED_IF_P,
               p: float | None = None, seed: int = 0) -> Rule:
        """Answer ``code`` (with a short body) instead of the file."""
        return self._add("status", path, times, p, seed, code=code)

    def redirect(self, location: str, *, path: str = "*", times=_UNLIMITED_IF_P, code: int = 302) -> Rule:
        """Answer ``code`` with ``Location: location`` instead of the file."""
        return self._add("redirect", path, times, None, 0, code=code, location=location)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def _add(self, kind: str, path: str, times, p: float | None, seed: int, **params) -> Rule:
        if times is _UNLIMITED_IF_P:
            times = 1 if p is None else None
        rule = Rule(kind, path.lstrip("/"), times, 1.0 if p is None else p, random.Random(seed),
                    **params)
        with self._lock:
            self._rules.append(rule)
        return rule

    def take(self, method: str, path: str) -> Rule | None:
        """The rule that spoils this request, if any, counted as used."""
        path = path.lstrip("/")
        with self._lock:
            for rule in self._rules:
                if rule.times is not None and rule.applied >= rule.times:
                    continue
                if not rule.applies_to(method) or not fnmatch.fnmatchcase(path, rule.path):
                    continue
                if rule.p < 1.0 and rule.rng.random() >= rule.p:
                    continue
                rule.applied += 1
                return rule
        return None


@dataclass
class _Serving:
    """What one start() runs: the listening server, its thread, and its open connections."""

    httpd: ThreadingHTTPServer
    thread: threading.Thread
    stopping: threading.Event = field(default_factory=threading.Event)
    connections: dict[socket.socket, threading.Thread] = field(default_factory=dict)


class ShardServer:
    """Serves ``root`` at ``url`` from a daemon thread; a context manager."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", ranges: bool = True,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.root = Path(root).resolve()
        self.host = host
        self.ranges = ranges
        self.tls = tls  # (certificate, key) PEM files: serve https
        self._ranges: list[tuple[str, str | None]] = []
        self.port = 0  # a free one at the first start(), then the same one
        self.faults = Faults()
        self._lock = threading.Lock()
        self._requests: list[tuple[str, str]] = []
        self._authorizations: list[str | None] = []
        self._serving: _Serving | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request received so far, spoiled ones included."""
        with self._lock:
            return list(self._requests)

    @property
    def range_requests(self) -> list[tuple[str, str | None]]:
        """(path, Range header or None) of every GET received so far."""
        with self._lock:
            return list(self._ranges)

    @property
    def authorizations(self) -> list[str | None]:
        """The Authorization header (or None) of every request received so far."""
        with self._lock:
            return list(self._authorizations)

    def start(self) -> ShardServer:
        if self._serving is not None:
            raise RuntimeError(f"ShardServer already serving at {self.url}")
        httpd = _HTTPServer((self.host, self.port), _Handler)
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*map(str, self.tls))
            httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        httpd.shard_server = self
        self.port = httpd.server_address[1]
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                  name=f"ShardServer:{self.port}", daemon=True)
        self._serving = httpd.serving = _Serving(httpd, thread)
        thread.start()
        return self

    def stop(self) -> None:
        """Refuse new connections and cut the open ones (stalled transfers included)."""
        serving, self._serving = self._serving, None
        if serving is None:
            return
        serving.stopping.set()
        serving.httpd.shutdown()
        serving.httpd.server_close()
        with self._lock:
            open_connections = dict(serving.connections)
        for sock, handler_thread in open_connections.items():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            handler_thread.join(timeout=5)
        serving.thread.join(timeout=5)

    def __enter__(self) -> ShardServer:
        return self if self._serving is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _record(self, method: str, path: str, range_header: str | None, authorization: str | None) -> None:
        with self._lock:
            self._requests.append((method, path))
            self._authorizations.append(authorization)
            if method == "GET":
                self._ranges.append((path, range_header))


class _HTTPServer(ThreadingHTTPServer):
    allow_reuse_address = True  # start() again on the port of connections still in TIME_WAIT
    daemon_threads = True  # stop() joins its handlers; these never outlive the test process
    shard_server: ShardServer
    serving: _Serving

    def handle_error(self, request, client_address) -> None:
        # Clients that give up mid-transfer are what fault tests are made of: stay quiet.
        # Anything else is a bug in the handler, and its traceback goes to stderr.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real shard servers do
    timeout = 30  # an idle keep-alive connection ends its thread
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.shard_server._lock:  # the lock stop() takes its snapshot under
            self.server.serving.connections[self.connection] = threading.current_thread()
            if self.server.serving.stopping.is_set():  # accepted just before stop(): cut too
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        with self.server.shard_server._lock:
            self.server.serving.connections.pop(self.connection, None)
        super().finish()

    def log_message(self, format, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.server.shard_server._record(self.command, path, self.headers.get("Range"),
                                         self.headers.get("Authorization"))
        rule = self.server.shard_server.faults.take(self.command, path)
        if rule is not None and rule.kind == "stall" and rule.after_bytes is None:
            if self.server.serving.stopping.wait(rule.seconds):
                return self._cut(reset=False)
        if rule is not None and rule.kind == "status":
            return self._send_short(rule.code, f"injected fault: {rule.code}\n")
        if rule is not None and rule.kind == "redirect":
            return self._send_short(rule.code, "moved\n", {"Location": rule.location})
        file = self._resolve(path)
        if file is None:
            return self._send_short(404, f"no such file: {path}\n")
        stat = file.stat()
        ranges = self.server.shard_server.ranges
        span = _byte_range(self.headers.get("Range") if ranges else None, stat.st_size)
        if span is None:
            return self._send_short(416, "unsatisfiable range\n",
                                    {"Content-Range": f"bytes */{stat.st_size}"})
        start, end = span
        partial = (start, end) != (0, stat.st_size)
        self.send_response(206 if partial else 200)
        content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(end - start))
        self.send_header("ETag", f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"')
        self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
        self.send_header("Accept-Ranges", "bytes" if ranges else "none")
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{stat.st_size}")
        self.end_headers()
        if send_body:
            with file.open("rb") as f:
                f.seek(start)
                self._send_body(f, end - start, rule)

    def _send_body(self, f, length: int, rule: Rule | None) -> None:
        if rule is not None and rule.kind == "drop":
            self._copy(f, min(rule.nbytes, length))
            return self._cut(rule.reset)
        if rule is not None and rule.kind == "stall":
            sent = self._copy(f, min(rule.after_bytes, length))
            if self.server.serving.stopping.wait(rule.seconds):
                return self._cut(reset=False)
            length -= sent
        self._copy(f, length)

    def _copy(self, f, length: int) -> int:
        left = length
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                break
            self.wfile.write(chunk)
            left -= len(chunk)
        self.wfile.flush()
        return length - left

    def _cut(self, reset: bool) -> None:
        """End the connection here, whatever the client still expects."""
        self.close_connection = True  # the server closes it once we return: a FIN
        if reset:  # close it now with a zero linger time: an RST (the server would FIN first)
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.connection.close()
                self.rfile.close()  # the last reference: the descriptor really closes now

    def _send_short(self, code: int, text: str, headers: dict[str, str] | None = None) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _resolve(self, path: str) -> Path | None:
        root = self.server.shard_server.root
        file = (root / path.lstrip("/")).resolve()
        return file if file.is_relative_to(root) and file.is_file() else None


def self_signed_certificate(folder: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A certificate for ``host`` (an IP address) that no system trusts, and its key."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", f"/CN={host}", "-addext", f"subjectAltName=IP:{host}"],
                   check=True, capture_output=True)
    return cert, key


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, end) of a single ``bytes=`` range (the whole file without one); None if
    unsatisfiable. Multi-range requests get the whole file, as RFC 9110 allows."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if match is None or match.groups() == ("", ""):
        return 0, size
    first, last = match.groups()
    if first == "":  # the last N bytes
        return (max(size - int(last), 0), size) if int(last) > 0 and size > 0 else None
    start, end = int(first), min(int(last) + 1 if last else size, size)
    return (start, end) if start < size and start < end else None
