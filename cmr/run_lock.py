"""One owner for a run directory, and a record of every launch that owned it.

Rank 0 takes an ``flock`` on ``RUN/.lock`` before anything in the directory is written and
holds it until its process ends. The kernel drops an flock with the last descriptor of the
process that took it, so a crash (SIGKILL, a lost node) never leaves a stale lock that blocks
``--resume auto``; a second training started on a directory in use stops before any work with
one line naming the holder. The descriptor is close-on-exec and no process is forked from a
rank, so no child keeps a dead rank's lock alive.

``RUN/launches.jsonl`` gets a line when a launch starts (host, pid, world size, the step it
resumed from, SLURM's job id and restart count) and one when it ends (outcome, steps run).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"
LAUNCHES_NAME = "launches.jsonl"


class RunDirBusy(RuntimeError):
    """Another process owns the run directory."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class RunLock:
    """``acquire()`` or raise :class:`RunDirBusy`; held until ``release()`` or process exit."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._describe(os.read(fd, 4096))
            os.close(fd)
            raise RunDirBusy(
                f"run directory {self.run_dir} is in use by {holder}: wait for that training to end "
                f"or stop it, or choose another --run-dir (the lock is {self.path}; it goes away "
                "with its process, so a crashed run never needs it removed)"
            ) from None
        os.ftruncate(fd, 0)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
        os.write(fd, (json.dumps(holder) + "\n").encode())
        self._fd = fd

    @staticmethod
    def _describe(raw: bytes) -> str:
        try:
            holder = json.loads(raw)
            return f"pid {holder['pid']} on {holder['host']} (started {holder['started']})"
        except (ValueError, KeyError, TypeError):
            return "another process (its lock file names no holder yet)"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def record_launch(run_dir: str | Path, event: str, **fields) -> dict:
    """Append one record to ``RUN/launches.jsonl`` (rank 0 only, while it holds the lock)."""
    record = {"event": event, "time": _now(), "host": socket.gethostname(), "pid": os.getpid(), **fields}
    with open(Path(run_dir) / LAUNCHES_NAME, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def read_launches(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / LAUNCHES_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
