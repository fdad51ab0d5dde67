"""Preemption: turn SIGUSR1/SIGTERM into a flag the training loop checks at step boundaries.

SLURM warns a job before it ends it (``#SBATCH --signal=USR1@120``: SIGUSR1 two minutes before the
time limit; SIGTERM on preemption or ``scancel``). Doing the save inside the signal handler is not
safe: the handler runs between two arbitrary bytecodes of the main thread, possibly in the middle
of a collective or a half-written file, and the ranks would get the signal at different steps. So
the handler only records that a signal came, and the trainer, at its next step boundary, asks all
ranks (:func:`any_rank`), saves a checkpoint collectively, asks SLURM to requeue the job from rank 0
(:func:`requeue_slurm_job`) and exits. The requeued job runs the same script with ``--resume auto``.

The launcher (``accelerate launch`` = torch elastic agent) must ignore SIGUSR1, or its default
action kills it and the job step ends under the workers mid-save: see launch/slurm/train.sbatch.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

import torch

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionHandler:
    """Context manager: installs the flag-setting handler on enter, restores the previous on exit.

    ``requested`` becomes True when one of ``signals`` arrives; ``signal_name`` is the first one
    ("SIGUSR1"). Later signals change nothing: the run is already on its way out, and the
    checkpoint at the next step boundary serves every reason to stop.
    Must be entered in the main thread (Python only delivers signals there).
    """

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS):
        self.signals = tuple(signal.Signals(s) for s in signals)
        if not self.signals:
            raise ValueError("PreemptionHandler needs at least one signal to listen for")
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only set the flag: no I/O, logging, locks or collectives in a signal handler.
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
            self.requested = True

    def __enter__(self) -> PreemptionHandler:
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError as err:  # not the main thread
                self._restore()
                message = f"PreemptionHandler must be entered in the main thread: {err}"
                raise RuntimeError(message) from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            # None: the previous handler was installed from C and cannot be reinstalled from
            # Python; the default action is the closest thing.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()


def running_under_slurm() -> bool:
    """True inside a SLURM job (batch script, ``srun`` step or ``salloc`` shell)."""
    return bool(os.environ.get("SLURM_JOB_ID"))


def requeue_slurm_job(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> str:
    """Ask SLURM to requeue this job: ``scontrol requeue $SLURM_JOB_ID``. Rank 0 only (the caller
    gates it), after the checkpoint is complete: SLURM then stops every task of the job.

    Returns one line for the log and never raises: a failed requeue must not turn a clean
    preemption exit (checkpoint written) into a crash.
    """
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return "not under SLURM: not requeued"
    try:
        result = run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return f"scontrol failed: scontrol not found on PATH; SLURM job {job_id} not requeued"
    except subprocess.TimeoutExpired:
        return f"scontrol failed: no answer in 60 s; SLURM job {job_id} may not be requeued"
    except Exception as err:  # noqa: BLE001 - the contract is one line, never a raise
        return f"scontrol failed: {type(err).__name__}: {err}; SLURM job {job_id} not requeued"
    if result.returncode != 0:
        detail = " ".join(((result.stderr or "") + " " + (result.stdout or "")).split())
        return (f"scontrol failed (exit {result.returncode}): {detail or 'no output'}; "
                f"SLURM job {job_id} not requeued")
    return f"requeued SLURM job {job_id}"


def any_rank(flag: bool, accelerator: Any) -> bool:
    """True on every rank when ``flag`` is True on at least one. COLLECTIVE: all ranks must call
    it at the same step, so they all stop at the same step even if only some got the signal."""
    count = torch.tensor([int(bool(flag))], dtype=torch.int64, device=accelerator.device)
    return bool(accelerator.reduce(count, reduction="sum").item() > 0)
