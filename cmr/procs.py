"""No process of a run outlives it.

torchrun starts every rank in a Unix session of its own, so killing the launcher (or its
process group) leaves the ranks running, and a spawned helper (reward-pool worker, DataLoader
worker) blocks forever on a queue whose other end is gone. Each such process calls
:func:`die_with_parent` once at start: Linux delivers SIGKILL to it the moment its parent
exits (``PR_SET_PDEATHSIG``); elsewhere a watchdog thread polls the parent pid.
"""

from __future__ import annotations

import ctypes
import os
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


def worker_init(_worker_id: int | None = None) -> None:
    """``worker_init_fn`` / pool ``initializer``: a worker ends with the process it serves, and
    leaves the preemption signals to it. SLURM sends them to every process of a job step
    (``--signal=USR1@N``, ``scancel --signal=USR1 --full``, preemption's SIGTERM): a worker
    killed by one would turn the rank's checkpoint-and-requeue into a DataLoader error."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent()
