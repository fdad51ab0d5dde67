"""Which device and which process group: one answer for every job that `accelerate launch` runs.

The trainer builds an ``Accelerator`` on it (:mod:`cmr.train.parallel`); evaluation and
feature extraction, which need no optimizer, a ``PartialState`` (:func:`process_state`). CPU
ranks must be told twice: ``cpu=`` (else each rank of `--multi_gpu` on a machine without GPUs
runs alone, world size 1) and the gloo backend (else DeepSpeed through accelerate quietly
does the same).
"""

from __future__ import annotations

import datetime
import os

import torch


def truthy(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def cpu_requested() -> bool:
    """ACCELERATE_USE_CPU=1: what `accelerate launch --cpu` sets, and tests/launch.py for N CPU ranks."""
    return truthy("ACCELERATE_USE_CPU")


def uses_cpu() -> bool:
    return cpu_requested() or not torch.cuda.is_available()


def launched() -> bool:
    """More than one process: a launcher set WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend() -> str | None:
    """gloo for CPU ranks; None leaves accelerate's choice (NCCL on GPUs)."""
    return "gloo" if uses_cpu() and launched() else None


def process_state(timeout_s: float = 600.0):
    """accelerate's view of this process among those launched, for jobs without an Accelerator."""
    from accelerate import PartialState

    kwargs = {"backend": backend()} if backend() else {}
    return PartialState(cpu=uses_cpu(), timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
