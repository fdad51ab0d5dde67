"""Launching real processes for tests: `accelerate launch` with N CPU processes over gloo."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ACCELERATE_USE_CPU="1",  # with --multi_gpu: N CPU processes over gloo
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def accelerate_launch(script: str | Path, *args: str, num_processes: int = 2, timeout: float = 300,
                      env: dict[str, str] | None = None, launcher_args: tuple[str, ...] = (),
                      config_file: str | Path | None = None, mixed_precision: str = "no") -> subprocess.CompletedProcess:
    """Run ``script`` under the real launcher; ``--cpu`` would silently start one process, so
    multi-process CPU runs use ``--multi_gpu`` with ACCELERATE_USE_CPU=1. With
    ``config_file``, the launch settings come from that accelerate YAML instead.
    ``mixed_precision``: the launcher's --mixed_precision (no, bf16, fp16)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        cmd += ["--config_file", str(config_file), "--main_process_port", str(free_port())]
    elif num_processes > 1:
        cmd += ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
                "--main_process_port", str(free_port()), "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    else:
        cmd += ["--num_processes", "1", "--cpu", "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    cmd += [*launcher_args, str(script), *args]
    return subprocess.run(cmd, cwd=REPO, env=env or cpu_env(), capture_output=True, text=True, timeout=timeout)


def deepspeed_env(**extra: str) -> dict[str, str]:
    """DeepSpeed on CPU: its CPU accelerator, and no ACCELERATE_USE_CPU (which turns DeepSpeed off)."""
    env = cpu_env(DS_ACCELERATOR="cpu", **extra)
    env.pop("ACCELERATE_USE_CPU")
    return env


def command(p) -> str:
    """A ``psutil.Process``'s command line, "" once it is gone (or a zombie waiting for its parent)."""
    import psutil

    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``result`` if its command succeeded; else fail with the tail of its output."""
    assert result.returncode == 0, result.stdout[-4000:] + "\n" + result.stderr[-6000:]
    return result
