"""Where shards live: local paths, http(s) URLs, object stores and ``pipe:`` commands.

The transport is other people's: webdataset's ``gopen`` opens ``pipe:`` commands; http(s) is
read in the reading process with the standard library's ``urllib`` (redirects, proxies from
the environment, TLS with the system's certificates, ``user:password@`` as Basic auth);
fsspec opens ``s3://``, ``gs://``, ``az://`` and the other object stores (s3fs/gcsfs/adlfs
installed as extras; credentials from their usual environment). This module chooses
between them, turns their failures into one-line errors with a reason, retries transient
ones, and keeps credentials and query strings out of every message.

Why not webdataset's own http opener: it runs ``curl`` per shard, and a curl process costs
about 8 ms of CPU to start (its 33 shared libraries): with 64-sample shards on 2 cores that
was 13-23% of the loader's throughput (``benchmarks/remote_speed.py``); read here, http
ran at 0.99-1.03x the local directory's samples/s.

A location is a ``Path``/local path string or a URL string. Shard lists are written as
webdataset and open_clip users write them: brace patterns (``https://host/{00000..00331}.tar``),
several patterns joined by ``::``, or a YAML list.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit, urlunsplit

import braceexpand

Location = str | Path

class RemoteError(OSError):
    """A shard or manifest could not be read. ``reason`` is the count's name, ``transient``
    whether trying again may help; the message never holds a secret."""

    def __init__(self, message: str, reason: str, transient: bool):
        super().__init__(message)
        self.reason = reason
        self.transient = transient


class PipeNotAllowed(ValueError):
    """A ``pipe:`` location without ``data.allow_pipe: true``."""


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(location: Location) -> bool:
    return isinstance(location, str) and (bool(_SCHEME.match(location)) or location.startswith("pipe:"))


def is_remote(location: Location) -> bool:
    """True for anything not on a local file system (``file://`` counts as local)."""
    return is_url(location) and not str(location).startswith("file:")


def local_path(location: Location) -> Path:
    text = str(location)
    return Path(re.sub(r"^file://", "", text)) if text.startswith("file:") else Path(text)


def redact(location: Location) -> str:
    """``location`` fit for a log line: no user:password, no query string, no pipe command
    beyond its program name."""
    text = str(location)
    if text.startswith("pipe:"):
        program = text[5:].strip().split(" ", 1)[0]
        return f"pipe:{program} …"
    if not is_url(text):
        return text
    parts = urlsplit(text)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "…" if parts.query else "", ""))


def redact_text(text: str, locations: list[Location]) -> str:
    """``text`` with every one of ``locations`` (and its query string) replaced by its redaction."""
    for location in sorted({str(x) for x in locations}, key=len, reverse=True):
        if is_url(location) and location != redact(location):
            text = text.replace(location, redact(location))
            query = urlsplit(location).query
            if query:
                text = text.replace(query, "…")
    return text


def redact_spec(spec):
    """A ``data.shards`` value (string, list or mapping) with every location redacted."""
    if isinstance(spec, dict):
        return {k: redact_spec(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [redact(x) for x in spec]
    return "::".join(redact(x) for x in str(spec).split("::"))


def expand(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Shard locations of a brace pattern, a ``::``-joined list of patterns or a list."""
    patterns = list(spec) if isinstance(spec, (list, tuple)) else str(spec).split("::")
    out: list[str] = []
    for pattern in patterns:
        out.extend(braceexpand.braceexpand(pattern.strip()))
    return out


def is_pattern(spec: str | list[str] | tuple[str, ...]) -> bool:
    """A shard list (rather than a dataset root whose split folders hold manifests)."""
    if isinstance(spec, (list, tuple)):
        return True
    spec = str(spec)
    path = urlsplit(spec).path if is_url(spec) else spec
    return "{" in spec or "::" in spec or path.endswith(".tar")


def join(base: Location, name: str) -> Location:
    """``base/name`` for a directory or a URL prefix (a query string stays at the end)."""
    if not is_url(base):
        return Path(base) / name
    parts = urlsplit(str(base))
    path = parts.path.rstrip("/") + "/" + name
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def basename(location: Location) -> str:
    """The file name of a location, without directory or query string."""
    if isinstance(location, Path) or not is_url(location):
        return Path(location).name
    return urlsplit(str(location)).path.rstrip("/").rsplit("/", 1)[-1]


def sibling(location: Location, name: str) -> Location:
    """The location of ``name`` in the same directory as ``location``."""
    if not is_url(location):
        return Path(location).with_name(name)
    parts = urlsplit(str(location))
    path = parts.path.rsplit("/", 1)[0] + "/" + name
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


@dataclasses.dataclass(frozen=True)
class Opener:
    """How to open a location: which transports are allowed, how long to wait, how often to
    retry. Picklable, so DataLoader workers carry it."""

    allow_pipe: bool = False
    max_retries: int = 3  # further attempts after a transient failure (reset, timeout, 5xx)
    retry_backoff_s: float = 1.0  # doubles with every attempt
    timeout_s: float = 60.0  # to connect, and the longest a transfer may stall
    ahead: bool = True  # open_ahead() starts transfers (data.open_ahead)

    def open(self, location: Location, start: int = 0) -> BinaryIO:
        """A readable binary stream; errors are ``RemoteError`` (or ``FileNotFoundError``).
        The stream :meth:`open_ahead` started for ``location``, if there is one.

        ``start``: the byte to begin at, where :meth:`can_start_at` says the transport can (an
        http Range request, an object store's ranged read). An http server that ignores Range
        sends the whole object from byte 0; the reader has to notice (``TarMembers`` does)."""
        text = str(location)
        ahead = _AHEAD.pop(text, None) if not start else None
        if ahead is not None:
            try:
                return ahead.result(timeout=self.timeout_s + 10)
            except OSError:  # RemoteError, or no answer in time: opened anew below, where the
                _discard(ahead)  # failure meets the reader's retries
        return self._open(location, start)

    def _open(self, location: Location, start: int = 0) -> BinaryIO:
        text = str(location)
        if start and not self.can_start_at(location):
            raise ValueError(f"{redact(text)}: cannot start a pipe: stream at byte {start}")
        if not is_remote(location):
            stream = open(local_path(location), "rb")
            stream.seek(start)
            return stream
        if text.startswith("pipe:"):
            if not self.allow_pipe:
                raise PipeNotAllowed(f"{redact(text)} runs a shell command; set data.allow_pipe: true to allow it")
            from webdataset.gopen import gopen
            return gopen(text, "rb")
        scheme = urlsplit(text).scheme
        if scheme in ("http", "https"):
            return _HttpStream(text, self.timeout_s, start)
        return _open_fsspec(text, start)

    @staticmethod
    def can_start_at(location: Location) -> bool:
        """Whether :meth:`open` can begin mid-object (everything but ``pipe:``)."""
        return not str(location).startswith("pipe:")

    def open_ahead(self, location: Location) -> None:
        """Start opening the shard to be read next, so its connection and first bytes are ready
        when the reader gets to it (a worker reads shards one after another; an http open
        costs a round trip, an object store's first byte 10-100 ms). http(s) only: a thread
        connects and reads the response's headers, then ends; the body waits in the socket.
        One stream ahead at a time; one not taken is closed when the next is started."""
        text = str(location)
        if not self.ahead or text in _AHEAD or urlsplit(text).scheme not in ("http", "https"):
            return
        for stale in list(_AHEAD):
            _discard(_AHEAD.pop(stale))
        future: Future = Future()

        def connect() -> None:
            try:
                future.set_result(self._open(location))
            except BaseException as err:  # noqa: BLE001 - handed to the reader, which decides
                future.set_exception(err)

        threading.Thread(target=connect, name="cmr-open-ahead", daemon=True).start()
        _AHEAD[text] = future

    def read_bytes(self, location: Location) -> bytes:
        """The whole of a small object (a manifest, a stats file), with retries."""
        return self.retry(lambda: _read_all(self.open(location)), location)

    def retry(self, call, location: Location):
        """``call()``, tried again after transient failures with exponential backoff."""
        for attempt in range(self.max_retries + 1):
            try:
                return call()
            except RemoteError as err:
                if not err.transient or attempt == self.max_retries:
                    raise
                time.sleep(self.backoff(attempt))
        raise AssertionError("unreachable")

    def stamp(self, location: Location) -> str:
        """What identifies this version of a remote object (size, ETag, mtime), "" if unknown."""
        text = str(location)
        scheme = urlsplit(text).scheme
        try:
            if scheme in ("http", "https"):
                return self.retry(lambda: _http_stamp(text, self.timeout_s), location)
            if text.startswith("pipe:") or not is_remote(text):
                return ""
            import fsspec

            fs, path = fsspec.core.url_to_fs(text)
            info = fs.info(path)
        except Exception as err:
            if not isinstance(err, (ValueError, ImportError)) and not is_store_failure(err):
                raise
            return ""
        fields = {k: info.get(k) for k in ("size", "ETag", "etag", "LastModified", "mtime", "generation")}
        return ";".join(f"{k}={v}" for k, v in fields.items() if v not in (None, ""))

    def backoff(self, attempt: int) -> float:
        return self.retry_backoff_s * 2**attempt


LOCAL = Opener()
# This process's streams being opened ahead (Opener.open_ahead), by location.
_AHEAD: dict[str, Future] = {}


def _discard(future: Future) -> None:
    """Close a stream opened ahead and not taken, once its opening ends."""
    def close(done: Future) -> None:
        if done.exception() is None:
            close_quietly(done.result())
    future.add_done_callback(close)


def _http_stamp(url: str, timeout_s: float) -> str:
    """Content-Length, ETag and Last-Modified of a HEAD request (of the object redirects end at)."""
    response = _http_request(url, timeout_s, method="HEAD")
    headers = {name.lower(): value for name, value in response.getheaders()}
    response.close()
    fields = [f"{k}={headers[k]}" for k in ("content-length", "etag", "last-modified") if headers.get(k)]
    return ";".join(fields) if ("etag" in headers or "last-modified" in headers) else ""


def _http_request(url: str, timeout_s: float, start: int = 0, method: str = "GET") -> http.client.HTTPResponse:
    """The response to ``method url`` (from byte ``start``: a Range request), its headers read;
    failures are ``RemoteError``. ``user:password@`` in the URL is sent as Basic auth, to the
    URL's host alone."""
    parts = urlsplit(url)
    headers = {"Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    handlers = []
    if parts.username is not None:
        # Sent with the first request, to this host only: a redirect elsewhere does not get it.
        host = parts.netloc.rsplit("@", 1)[1]
        url = urlunsplit((parts.scheme, host, parts.path, parts.query, ""))
        passwords = urllib.request.HTTPPasswordMgrWithPriorAuth()
        passwords.add_password(None, f"{parts.scheme}://{host}/", unquote(parts.username),
                               unquote(parts.password or ""), is_authenticated=True)
        handlers.append(urllib.request.HTTPBasicAuthHandler(passwords))
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        return urllib.request.build_opener(*handlers).open(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        err.close()
        raise _status_error(url, err.code) from None
    except urllib.error.URLError as err:
        raise _connection_error(url, err.reason) from None
    except (OSError, http.client.HTTPException) as err:
        raise _connection_error(url, err) from None


def _status_error(url: str, code: int) -> RemoteError:
    where = redact(url)
    if code in (404, 410):
        return RemoteError(f"{where}: not found (HTTP {code})", "missing_shard", transient=False)
    if code == 416:  # a Range past the end: the object is shorter than when it was opened
        return RemoteError(f"{where}: range not satisfiable (HTTP 416)", "range_not_satisfiable", transient=True)
    if code in (401, 403):
        return RemoteError(f"{where}: access denied (HTTP {code}); check the credentials", "unreachable_shard",
                           transient=False)
    transient = code >= 500 or code in (408, 429)
    return RemoteError(f"{where}: HTTP {code}", "unreachable_shard", transient=transient)


def _connection_error(url: str, reason) -> RemoteError:
    """A failure below HTTP: resolving, connecting, TLS, a reset or a stall."""
    where = redact(url)
    if isinstance(reason, ssl.SSLCertVerificationError):
        return RemoteError(f"{where}: TLS certificate not trusted ({reason.verify_message})", "unreachable_shard",
                           transient=False)
    if isinstance(reason, socket.gaierror):
        meaning = "host not resolved"
    elif isinstance(reason, ConnectionRefusedError):
        meaning = "connection refused"
    elif isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError
        meaning = "timed out"
    elif isinstance(reason, (ConnectionResetError, http.client.RemoteDisconnected)):
        meaning = "connection reset"
    elif isinstance(reason, http.client.IncompleteRead):
        meaning = "connection dropped mid-file"
    elif isinstance(reason, ssl.SSLError):
        meaning = "TLS failed"
    else:
        meaning = f"connection failed ({type(reason).__name__})"
    return RemoteError(f"{where}: {meaning}", "unreachable_shard", transient=True)


def _read_all(stream: BinaryIO) -> bytes:
    try:
        return stream.read()
    finally:
        close_quietly(stream)


def close_quietly(stream) -> None:
    """Close a stream whose transfer may have failed; its error was reported already."""
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - a failed transfer's close repeats its failure
        pass


class _Stream(io.RawIOBase):
    """A readable raw stream whose subclasses define ``read``; ``tarfile``'s stream mode calls it."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _HttpStream(_Stream):
    """The body of one http(s) GET, read in this process. No retries of its own: the reader's
    know where the stream was. A transfer that stalls for ``timeout_s`` or ends before its
    Content-Length raises ``RemoteError`` on the read that meets it."""

    def __init__(self, url: str, timeout_s: float, start: int = 0):
        self.url = url
        self.response = _http_request(url, timeout_s, start)

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.response.read(size if size is not None and size >= 0 else None)
        except (OSError, http.client.HTTPException) as err:
            raise _connection_error(self.url, err) from None
        if not data and size and self.response.length:  # the server closed before the end
            raise _connection_error(self.url, http.client.IncompleteRead(b"", self.response.length))
        return data

    def close(self) -> None:
        if not self.closed:
            self.response.close()  # abandoned mid-transfer (a piece that ends before the shard does)
        super().close()


def _open_fsspec(url: str, start: int = 0) -> BinaryIO:
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with the project's dependencies
        raise RemoteError(f"{redact(url)}: reading it needs fsspec", "unreachable_shard", transient=False) from None
    scheme = urlsplit(url).scheme
    try:
        stream = _StoreStream(url, fsspec.open(url, "rb").open())
    except ImportError as err:
        package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(scheme, "")
        hint = f"; pip install {package} (or cmr[{scheme}])" if package else ""
        raise RemoteError(f"{redact(url)}: no file system for {scheme}://{hint} ({err.msg.splitlines()[0]})",
                          "unreachable_shard", transient=False) from None
    except ValueError as err:  # fsspec: unknown protocol
        raise RemoteError(f"{redact(url)}: {err}", "unreachable_shard", transient=False) from None
    except Exception as err:
        if not is_store_failure(err):
            raise
        raise _store_error(url, err) from None
    if start:
        stream.seek(start)  # fsspec's files read ranges: nothing before ``start`` is fetched
    return stream


# Packages whose exceptions are an object store's failures although they are not OSErrors:
# botocore's EndpointConnectionError and ReadTimeoutError under s3fs (an endpoint that went
# away), aiohttp's ClientPayloadError, google-auth's TransportError under gcsfs, azure-core's
# ServiceRequestError under adlfs.
_STORE_CLIENTS = frozenset({"adlfs", "aiobotocore", "aiohttp", "azure", "botocore", "gcsfs", "google", "requests",
                            "s3fs", "urllib3"})


def is_store_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failure of the store or the way to it (an OSError, or an exception
    of an object store's client library), not a bug of the caller's."""
    return isinstance(err, OSError) or any(cls.__module__.partition(".")[0] in _STORE_CLIENTS
                                           for cls in type(err).__mro__)


def _store_error(url: str, err: BaseException) -> RemoteError:
    where = redact(url)
    if isinstance(err, FileNotFoundError):
        return RemoteError(f"{where}: not found", "missing_shard", transient=False)
    if isinstance(err, PermissionError):
        return RemoteError(f"{where}: access denied; check the credentials", "unreachable_shard", transient=False)
    detail = redact_text(str(err), [url]) or type(err).__name__
    return RemoteError(f"{where}: {detail}", "unreachable_shard", transient=True)


class _StoreStream(_Stream):
    """An object store's file (fsspec) whose client's failures, on a read as on the open, are
    ``RemoteError``: s3fs lets botocore's errors through once its own retries are spent."""

    def __init__(self, url: str, file):
        self.url, self.file = url, file

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def read(self, size: int = -1) -> bytes:
        try:
            return self.file.read(size)
        except Exception as err:
            if not is_store_failure(err):
                raise
            raise _store_error(self.url, err) from None

    def close(self) -> None:
        if not self.closed:
            close_quietly(self.file)
        super().close()
