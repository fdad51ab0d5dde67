"""Reading WebDataset tars: samples grouped by key, with damage turned into counted placeholders.

A shard is read as a stream of samples (dicts of ``extension -> bytes`` plus ``__key__``).
When a tar is damaged, the reader does not raise: every sample the plan expected but could
not get becomes a ``Missing(reason)`` placeholder, so positions in the stream (and with
them batch windows and resume points) stay exactly where the plan put them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tarfile
import time
from collections.abc import Callable, Iterator

from webdataset.tariterators import base_plus_ext

from cmr.data.remote import (LOCAL, Location, Opener, RemoteError, close_quietly, is_remote, local_path, redact,
                             redact_text)

log = logging.getLogger(__name__)

# The payload extensions a sample may carry; a tar member group with none of them is not a
# sample (img2dataset, for one, also writes per-shard parquet/stats files beside the tars).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
FEATURE_EXTENSIONS = ("feat.npy",)
PAYLOAD_EXTENSIONS = IMAGE_EXTENSIONS + FEATURE_EXTENSIONS


@dataclasses.dataclass(frozen=True)
class Missing:
    """Stands in for a sample that could not be read (e.g. the tar is truncated)."""

    reason: str
    key: str = ""


def _is_sample(group: dict) -> bool:
    return any(ext in group for ext in PAYLOAD_EXTENSIONS)


class TarMembers:
    """The members of one tar in file order, as ``(key, extension, bytes | None)``; contents
    are read only for the extensions ``read`` accepts (the others are skipped unread).

    A local tar is read with random access. A remote one is a stream: after a transient
    failure (reset, stall, 5xx) it is reopened with backoff at the byte after the last member
    delivered (an http Range request, an object store's ranged read), so a fault loses
    nothing, shifts nothing and fetches no byte twice that was used. Where the store cannot
    start there (``pipe:``; an http server that ignores Range and sends the whole tar, which
    shows in its first member), the stream starts over and is advanced past the members
    already delivered. Damage does not raise:
    iteration ends early and ``failure`` names the reason (``truncated_shard``,
    ``missing_shard``, ``unreachable_shard``), ``message`` says what happened.
    """

    def __init__(self, location: Location, opener: Opener = LOCAL, read: Callable[[str], bool] = lambda ext: True):
        self.location, self.opener, self.read = location, opener, read
        self.failure: str | None = None
        self.message = ""
        self.retries = 0
        self._delivered = 0  # members delivered so far (those the walk counts)
        self._resume_at = 0  # the byte after the last delivered member (a header starts there)
        self._first_name: str | None = None  # the tar's first member, to tell a whole-tar answer

    def __iter__(self) -> Iterator[tuple[str, str, bytes | None]]:
        if is_remote(self.location):
            yield from self._remote()
            return
        path = local_path(self.location)
        try:
            with tarfile.open(path, mode="r:") as tar:
                yield from self._walk(tar)
        except (OSError, tarfile.TarError, EOFError) as err:
            self._fail("truncated_shard" if path.exists() else "missing_shard", f"{path}: {err}")

    def _remote(self) -> Iterator[tuple[str, str, bytes | None]]:
        where = redact(self.location)
        for attempt in range(self.opener.max_retries + 1):
            stream = None
            start = self._resume_at if self.opener.can_start_at(self.location) else 0
            try:
                stream = self.opener.open(self.location, start)
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    yield from self._walk(tar, start)
                return
            except RemoteError as err:
                if not err.transient:
                    self._fail(err.reason, str(err))
                    return
                if err.reason == "range_not_satisfiable":  # the tar changed: start over, skip ahead
                    self._resume_at = 0
                message = str(err)
            except (tarfile.TarError, EOFError) as err:  # the bytes arrived, and are damaged
                self._fail("truncated_shard", f"{where}: {err}")
                return
            except OSError as err:  # an object store's stream failed mid-read
                message = f"{where}: {redact_text(str(err), [self.location])}"
            finally:
                if stream is not None:
                    close_quietly(stream)
            if attempt < self.opener.max_retries:
                self.retries += 1
                log.warning("%s; retry %d of %d in %.1f s (resuming after member %d, byte %d)", message,
                            attempt + 1, self.opener.max_retries, self.opener.backoff(attempt), self._delivered,
                            self._resume_at)
                time.sleep(self.opener.backoff(attempt))
        self._fail("unreachable_shard", f"{message} (gave up after {self.opener.max_retries} retries)")

    def _walk(self, tar: tarfile.TarFile, start: int = 0) -> Iterator[tuple[str, str, bytes | None]]:
        """The members of ``tar``, a stream that begins at byte ``start`` of the shard: at 0, or
        right after the last member delivered."""
        position = self._delivered if start else 0
        for index, member in enumerate(tar):
            if index == 0:
                if start and member.name == self._first_name:  # the server ignored the Range
                    start = position = 0
                elif not start:
                    self._first_name = member.name
            if not member.isreg():
                continue
            prefix, suffix = base_plus_ext(member.name)
            if prefix is None or os.path.basename(member.name).startswith(("__", ".")):
                continue
            position += 1
            if position <= self._delivered:
                continue  # delivered before the stream broke
            suffix = suffix.lower()
            data = None
            if self.read(suffix):
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
            self._delivered = position
            self._resume_at = start + member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            yield prefix, suffix, data

    def _fail(self, reason: str, message: str) -> None:
        self.failure, self.message = reason, message
        if is_remote(self.location):  # a local tar's damage is counted, and shown by validate
            log.warning("%s (%s)", message, reason)


def iter_tar_samples(location: Location, opener: Opener = LOCAL, members: TarMembers | None = None) -> Iterator[dict]:
    """Yield the samples of one tar in file order.

    A damaged tar (truncated, garbage, unreachable) simply ends early instead of raising:
    the last, possibly partial, group is dropped and the caller accounts for the samples
    that never came by comparing with the count the manifest promised (``members.failure``
    says why, when the caller passes its own ``TarMembers``).
    """
    members = members or TarMembers(location, opener)
    current: dict | None = None
    for prefix, suffix, data in members:
        if current is not None and current["__key__"] != prefix:
            if _is_sample(current):
                yield current
            current = None
        if current is None:
            current = {"__key__": prefix}
        current[suffix] = data
    if current is not None and _is_sample(current) and members.failure is None:
        yield current


def read_piece(location: Location, start: int, stop: int, opener: Opener = LOCAL) -> Iterator[dict | Missing]:
    """Samples ``[start, stop)`` of one shard, padded with ``Missing`` if the tar ends early."""
    num_read = 0
    members = TarMembers(location, opener)
    if stop > start:
        samples = iter_tar_samples(location, members=members)
        try:
            for index, sample in enumerate(samples):
                if index >= start:
                    yield sample
                    num_read += 1
                    if index == stop - 1:
                        break
        finally:
            samples.close()  # a remote stream's transfer stops here, not at garbage collection
    reason = members.failure or "truncated_shard"
    for _ in range(stop - start - num_read):
        yield Missing(reason)


def count_tar_samples(location: Location, opener: Opener = LOCAL, members: TarMembers | None = None) -> int:
    """Number of samples in a tar, from its headers (contents are skipped unread); a damaged
    tar counts what is readable (its partial last group is dropped)."""
    count, key, extensions = 0, None, set()
    members = members or TarMembers(location, opener, read=lambda ext: False)
    for prefix, suffix, _ in members:
        if prefix != key:
            count += bool(extensions & set(PAYLOAD_EXTENSIONS))
            key, extensions = prefix, set()
        extensions.add(suffix)
    if members.failure is None:
        count += bool(extensions & set(PAYLOAD_EXTENSIONS))
    return count


def read_members(location: Location, extensions: tuple[str, ...],
                 opener: Opener = LOCAL) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) for members with the given extensions only; other members'
    contents are skipped without reading them (cheap way to collect all captions)."""
    for prefix, suffix, data in TarMembers(location, opener, read=lambda ext: ext in extensions):
        if data is not None:
            yield prefix, suffix, data
