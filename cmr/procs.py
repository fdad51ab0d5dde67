"""No process of a run outlives it.

torchrun starts every rank in a Unix session of its own, so killing the launcher (or its
process group) leaves the ranks running, and a spawned helper (reward-pool worker, DataLoader
worker) blocks forever on a queue whose other end is gone. Each such process calls
:func:`die_with_parent` once at start: Linux delivers SIGKILL to it the moment its parent
exits (``PR_SET_PDEATHSIG``); elsewhere a watchdog thread polls the parent pid.

A DataLoader worker from a forkserver is the forkserver's child, not its rank's, and keeps
the forkserver alive (it inherits the forkserver's "alive" pipe): it watches its rank's pid
instead (:func:`die_with`, a pidfd that becomes readable when the rank exits).
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, interval_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(interval_s)
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(parent: int | None = None, interval_s: float = 1.0) -> None:
    """Make this process end when ``parent`` (default: its current parent) exits.

    The death signal is armed after the parent may already have gone (a race with the
    ``fork``), so the parent pid is checked once more afterwards.
    """
    parent = os.getppid() if parent is None else parent
    if not _set_parent_death_signal(signal.SIGKILL):
        threading.Thread(target=_watch_parent, args=(parent, interval_s), daemon=True,
                         name="cmr-parent-watchdog").start()
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def _watch_pid(pid: int, interval_s: float) -> None:
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (old kernel, not Linux): poll
        while _alive(pid):
            time.sleep(interval_s)
    else:
        select.select([fd], [], [])  # readable once the process has exited
    os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with(owner: int, interval_s: float = 1.0) -> None:
    """End this process when ``owner`` exits: its parent through the death signal, any other
    process through a watchdog thread."""
    if owner == os.getppid():
        die_with_parent(owner, interval_s)
        return
    threading.Thread(target=_watch_pid, args=(owner, interval_s), daemon=True, name="cmr-owner-watchdog").start()
    if not _alive(owner):
        os.kill(os.getpid(), signal.SIGKILL)


def launched_by_a_launcher() -> bool:
    """True in a rank that ``accelerate launch`` / ``torchrun`` started: its parent is the
    launcher, whose death must end it. A process started by hand (or under nohup) is left
    alone: its parent is a shell whose exit must not stop a training."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return True
    try:  # accelerate's one-process launcher runs the script as a plain subprocess
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent_cmd = f.read().replace(b"\0", b" ")
    except OSError:
        return False
    return b"accelerate" in parent_cmd and b"launch" in parent_cmd


def end_with_launcher() -> None:
    """Called first thing in every entry point that ``accelerate launch`` runs."""
    if launched_by_a_launcher():
        die_with_parent()


def serve(owner: int) -> None:
    """Start of a helper process (pool ``initializer``): it ends with ``owner``, and leaves the
    preemption signals to it. SLURM sends them to every process of a job step
    (``--signal=USR1@N``, ``scancel --signal=USR1 --full``, preemption's SIGTERM): a worker
    killed by one would turn the rank's checkpoint-and-requeue into a DataLoader error."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    die_with(owner)


class WorkerInit:
    """``worker_init_fn`` of a DataLoader: the worker ends with the rank that made the loader
    (spawned: its parent; from a forkserver: a process it watches), and sees the rank's
    environment as it is now: a forkserver started earlier holds the environment of then
    (credentials or an endpoint set since, e.g. for s3fs, would be missing)."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        self.environ = dict(os.environ)

    def __call__(self, _worker_id: int) -> None:
        serve(self.owner)
        if dict(os.environ) != self.environ:
            os.environ.clear()
            os.environ.update(self.environ)
