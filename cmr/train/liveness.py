"""Which rank vanished: a heartbeat per rank in the process group's key-value store.

A rank that dies or stops (SIGSTOP, a lost node, a wedged host) leaves its peers waiting in
the next collective until ``train.collective_timeout_s``; gloo's error then says only that a
receive timed out. Each rank's heartbeat thread writes a counter to the store every few
seconds; when a collective fails, :meth:`Heartbeat.silent_ranks` names the ranks whose
counter stopped moving, so the error says which rank to look at.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist


def _default_store():
    try:
        return dist.distributed_c10d._get_default_store()  # noqa: SLF001 - no public accessor
    except (RuntimeError, AttributeError, ValueError):
        return None


class Heartbeat:
    def __init__(self, rank: int, world_size: int, interval_s: float):
        self.rank, self.world_size, self.interval_s = rank, world_size, interval_s
        self.store = _default_store() if world_size > 1 and dist.is_initialized() else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beats = 0

    def _key(self, rank: int) -> str:
        return f"cmr/heartbeat/{rank}"

    def start(self) -> Heartbeat:
        if self.store is not None and self._thread is None:
            self._beat()
            self._thread = threading.Thread(target=self._run, daemon=True, name="cmr-heartbeat")
            self._thread.start()
        return self

    def _beat(self) -> None:
        self._beats += 1
        value = {"beat": self._beats, "host": socket.gethostname(), "pid": os.getpid()}
        self.store.set(self._key(self.rank), json.dumps(value))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - the store is gone with the launcher: stop beating
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)
            self._thread = None

    def _read(self) -> dict[int, dict]:
        beats = {}
        for rank in range(self.world_size):
            key = self._key(rank)
            if rank != self.rank and self.store.check([key]):
                beats[rank] = json.loads(self.store.get(key))
        return beats

    def silent_ranks(self) -> list[tuple[int, dict]] | None:
        """Peers whose heartbeat does not move over three intervals (with what they last
        said: host, pid); None when the store itself does not answer."""
        if self.store is None:
            return None
        try:
            self.store.set_timeout(timedelta(seconds=10))
            before = self._read()
            time.sleep(3 * self.interval_s)
            after = self._read()
        except Exception:  # noqa: BLE001 - the store is gone too: nothing to say
            return None
        never = [(r, {}) for r in range(self.world_size) if r != self.rank and r not in after]
        stuck = [(r, after[r]) for r in after if before.get(r, {}).get("beat") == after[r]["beat"]]
        return sorted(never + stuck, key=lambda item: item[0])


def describe_silent(silent: list[tuple[int, dict]]) -> str:
    parts = []
    for rank, info in silent:
        where = f" (pid {info['pid']} on {info['host']})" if info else " (it never reported)"
        parts.append(f"rank {rank}{where}")
    return ", ".join(parts)
