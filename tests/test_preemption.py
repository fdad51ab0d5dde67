"""Preemption: real signals to real processes set the flag, SLURM requeue through a stand-in
`scontrol`, and the real `accelerate launch` surviving SIGUSR1 while its workers stop together."""

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from cmr.train.preemption import PreemptionHandler, requeue_slurm_job, running_under_slurm
from tests.launch import REPO, cpu_env

WORKER = REPO / "tests" / "dist" / "preemption_worker.py"
CPU_2PROC = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_signal_sets_the_flag_and_the_previous_handler_comes_back(sig):
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    original = signal.signal(sig, previous)
    try:
        with PreemptionHandler() as preemption:
            assert not preemption.requested and preemption.signal_name is None
            os.kill(os.getpid(), sig)
            wait_until(lambda: preemption.requested)
            assert preemption.signal_name == sig.name
            assert calls == []  # ours replaced the previous handler while active
        assert signal.getsignal(sig) is previous
        os.kill(os.getpid(), sig)
        wait_until(lambda: calls == [sig])  # and it is really back in charge
    finally:
        signal.signal(sig, original)


def test_first_signal_is_the_one_remembered():
    with PreemptionHandler() as preemption:
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_until(lambda: preemption.requested)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    assert preemption.signal_name == "SIGUSR1"


def test_handlers_are_restored_when_the_block_raises():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    with pytest.raises(KeyError), PreemptionHandler():
        raise KeyError("boom")
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_only_the_chosen_signals_are_taken():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler(signals=[signal.SIGUSR1]) as preemption:
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.getsignal(signal.SIGUSR1) == preemption._on_signal


def test_entering_outside_the_main_thread_is_a_clear_error():
    errors = []

    def enter():
        try:
            with PreemptionHandler():
                pass
        except RuntimeError as err:
            errors.append(str(err))

    before = signal.getsignal(signal.SIGUSR1)
    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in errors[0]
    assert signal.getsignal(signal.SIGUSR1) is before


def test_an_ignored_signal_stays_ignored_through_exec_until_a_worker_takes_it():
    """The mechanism the sbatch relies on: `trap "" USR1; exec` leaves the launcher ignoring
    SIGUSR1, its child starts ignoring it too, and PreemptionHandler in the child takes it."""
    child = (
        "import os, signal, time\n"
        "from cmr.train.preemption import PreemptionHandler\n"
        "print('child-ignores', signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN)\n"
        "with PreemptionHandler() as p:\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    while not p.requested: time.sleep(0.01)\n"
        "print('child-flag', p.signal_name)\n"
    )
    launcher = (
        "import os, signal, subprocess, sys\n"
        "ignored = signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN\n"
        "print('launcher-ignores', ignored, flush=True)\n"
        f"subprocess.run([sys.executable, '-c', {child!r}], check=True, start_new_session=True)\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "print('launcher-alive')\n"
    )
    command = ["bash", "-c", 'trap "" USR1; exec "$0" -c "$1"', sys.executable, launcher]
    result = subprocess.run(command, cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:4] == [
        "launcher-ignores True", "child-ignores True", "child-flag SIGUSR1", "launcher-alive"]


def test_running_under_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert not running_under_slurm()
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert running_under_slurm()


def fake_scontrol(bin_dir: Path, log: Path, exit_code: int = 0, stderr: str = "") -> None:
    """A stand-in `scontrol` (no SLURM here) that appends its arguments to ``log``."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\necho "{stderr}" >&2\nexit {exit_code}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_requeue_runs_scontrol_requeue_with_the_job_id(tmp_path, monkeypatch):
    log = tmp_path / "scontrol.log"
    fake_scontrol(tmp_path / "bin", log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert requeue_slurm_job() == "requeued SLURM job 123"
    assert log.read_text() == "requeue 123\n"


def test_requeue_outside_slurm_does_nothing(tmp_path, monkeypatch):
    log = tmp_path / "scontrol.log"
    fake_scontrol(tmp_path / "bin", log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert requeue_slurm_job() == "not under SLURM: not requeued"
    assert not log.exists()


def test_requeue_without_scontrol_returns_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no scontrol anywhere
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    message = requeue_slurm_job()
    assert message.startswith("scontrol failed:") and "not found" in message and "123" in message
    assert "\n" not in message


def test_requeue_refused_by_slurm_returns_its_reason_on_one_line(tmp_path, monkeypatch):
    fake_scontrol(tmp_path / "bin", tmp_path / "log", exit_code=1,
                  stderr="scontrol: error: Requested operation is presently disabled")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    message = requeue_slurm_job()
    assert message == ("scontrol failed (exit 1): scontrol: error: Requested operation is "
                       "presently disabled; SLURM job 77 not requeued")


def test_requeue_with_a_hanging_scontrol_returns_a_message(monkeypatch):
    def hanging_run(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setenv("SLURM_JOB_ID", "5")
    assert requeue_slurm_job(run=hanging_run).startswith("scontrol failed: no answer")


# --- the real launcher --------------------------------------------------------------------------

def start_launcher(out: Path, env: dict[str, str], ignore_usr1: bool) -> subprocess.Popen:
    """`accelerate launch` with the CPU 2-process YAML, started the way the sbatch starts it."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
              str(WORKER), "--out", str(out)]
    trap = 'trap "" USR1; ' if ignore_usr1 else ""
    with open(out / "launcher.log", "w") as log:  # a file, not a pipe nobody reads while waiting
        return subprocess.Popen(["bash", "-c", trap + 'exec "$@"', "bash", *launch], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT)


def launcher_output(out: Path) -> str:
    return (out / "launcher.log").read_text()[-3000:]


def signal_like_slurm(launcher: subprocess.Popen, out: Path) -> list[psutil.Process]:
    """Send SIGUSR1 to the launcher and every process under it, as SLURM's cgroup-wide signal
    does: killpg of the launcher's group would miss the workers, which torch elastic starts in
    sessions of their own. Returns the workers."""
    wait_until(lambda: all((out / f"ready.rank{r}").exists() for r in range(2)) or
               launcher.poll() is not None, timeout=240)
    assert launcher.poll() is None, launcher_output(out)
    tree = psutil.Process(launcher.pid)
    workers = tree.children(recursive=True)
    assert {p.pid for p in workers} >= {int((out / f"ready.rank{r}").read_text()) for r in range(2)}
    for process in [tree, *workers]:
        process.send_signal(signal.SIGUSR1)
    return workers


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory):
    """One real 2-process run, signalled like SLURM does it, with a stand-in scontrol."""
    out = tmp_path_factory.mktemp("preempted")
    log = out / "scontrol.log"
    fake_scontrol(out / "bin", log)
    env = cpu_env(SLURM_JOB_ID="123", PATH=f"{out / 'bin'}{os.pathsep}{os.environ['PATH']}")
    launcher = start_launcher(out, env, ignore_usr1=True)
    try:
        signal_like_slurm(launcher, out)
        launcher.wait(timeout=120)
    finally:
        launcher.kill()
    output = launcher_output(out)
    records = [json.loads((out / f"rank{r}.json").read_text()) if (out / f"rank{r}.json").exists()
               else None for r in range(2)]
    return launcher.returncode, output, records, log


@pytest.mark.slow
@pytest.mark.distributed
def test_launcher_survives_sigusr1_and_both_workers_stop_and_requeue(preempted_run):
    returncode, output, records, scontrol_log = preempted_run
    assert returncode == 0, output
    assert [r["rank"] for r in records] == [0, 1] and records[0]["pid"] != records[1]["pid"]
    for record in records:
        assert record["requested"] and record["signal_name"] == "SIGUSR1"
    # Both stopped at the same step (they agreed), and only rank 0 asked SLURM to requeue.
    assert records[0]["steps"] == records[1]["steps"]
    assert records[0]["requeue"] == "requeued SLURM job 123" and "requeue" not in records[1]
    assert scontrol_log.read_text() == "requeue 123\n"


@pytest.mark.slow
@pytest.mark.distributed
def test_any_rank_agrees_across_real_ranks(preempted_run):
    _, output, records, _ = preempted_run
    assert all(r is not None for r in records), output
    for record in records:
        assert record["world_size"] == 2
        assert record["any_rank_none"] is False
        assert record["any_rank_only_rank1"] is True  # rank 0 learns about rank 1's flag


@pytest.mark.slow
@pytest.mark.distributed
def test_without_the_trap_sigusr1_kills_the_launcher(tmp_path):
    """Why the sbatch ignores SIGUSR1 in the launcher: otherwise the signal kills it (and under
    SLURM the step would end under the workers while they save)."""
    launcher = start_launcher(tmp_path, cpu_env(), ignore_usr1=False)
    workers = []
    try:
        workers = signal_like_slurm(launcher, tmp_path)
        assert launcher.wait(timeout=120) == -signal.SIGUSR1, launcher_output(tmp_path)
    finally:
        launcher.kill()
        # The orphaned workers got the signal too and finish on their own; make sure they do.
        _, alive = psutil.wait_procs(workers, timeout=60)
        for process in alive:
            process.kill()


@pytest.mark.slow
def test_a_signal_while_the_run_sets_up_is_acted_on_at_the_first_step(tmp_path):
    """SLURM's time-limit warning (--signal=USR1@N) may come before the training loop runs:
    launch/train.py listens from before the setup, so the run checkpoints at its first step
    boundary and stops, rather than dying of SIGUSR1 or (under the sbatch's trap) missing it."""
    from tests.test_train import TRAIN, train_args
    from tests.tiny_data import train_val_shards

    shards, run = train_val_shards(tmp_path / "shards"), tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(TRAIN), *train_args(shards, run)], cwd=REPO, env=cpu_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The run dir's lock is the first thing the setup writes; data, model and wandb follow.
        wait_until(lambda: (run / ".lock").exists() or process.poll() is not None, timeout=120)
        process.send_signal(signal.SIGUSR1)
        output = process.communicate(timeout=180)[0]
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    assert "training preempted at step 1" in output, output[-3000:]
    assert (run / "checkpoints" / "step-00000001").is_dir()
