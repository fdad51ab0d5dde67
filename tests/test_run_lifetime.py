"""A run directory has one owner, no process of a run outlives it, and a crashed run resumes.

Every test launches the real trainer under `accelerate launch` with 2 CPU processes and
kills or stops real processes: the launcher alone (the orphan case), every process at once
(a machine crash), one rank (SIGSTOP: a wedged or lost node).
"""

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from cmr.run_dir import RunDir, RunDirBusy, RunLock, read_meta
from tests.launch import REPO, accelerate_launch, command, cpu_env, free_port, ok
from tests.test_train import TRAIN, evals, losses, metrics, train_args
from tests.tiny_data import train_val_shards

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# 30 steps of 2 ranks x 4 (6 per epoch); a checkpoint every 5 steps and at the ends of
# stages (12, 18); a DataLoader worker per lane and a reward-pool worker per rank, so their
# processes are in the tree too.
RUN = ["data.batch_size=4", "data.num_workers=1", "train.checkpoint.every_n_steps=5", "reward.num_workers=1"]
TOTAL_STEPS = 30


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return train_val_shards(tmp_path_factory.mktemp("lifetime_shards"))


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """The same run, never interrupted."""
    run = tmp_path_factory.mktemp("reference") / "run"
    ok(accelerate_launch(TRAIN, *train_args(shards, run, *RUN)))
    return run


def launch(shards, run_dir, *overrides, env=None):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", str(TRAIN), *train_args(shards, run_dir, *overrides), "--resume", "auto"]
    return subprocess.Popen(cmd, cwd=REPO, env=env or cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_until(condition, process, timeout=240, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert process.poll() is None, f"run ended before {what}: " + process.stdout.read()[-4000:]
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def reached(run_dir, step):
    return lambda: (run_dir / "metrics.jsonl").exists() and any(r["step"] >= step for r in metrics(run_dir))


def ranks_of(launcher: psutil.Process) -> list[psutil.Process]:
    return [p for p in launcher.children() if "train.py" in command(p)]


def tree(launcher: psutil.Process) -> list[psutil.Process]:
    """The launcher's descendants: ranks, their DataLoader and reward workers, trackers."""
    return launcher.children(recursive=True)


def helpers_of(rank: psutil.Process) -> list[psutil.Process]:
    """A rank's worker processes: reward pool (spawned), DataLoader (from its forkserver)."""
    found = []
    for child in rank.children():
        cmd = command(child)
        found += child.children() if "forkserver" in cmd else [child] if "spawn_main" in cmd else []
    return found


def gone_within(procs: list[psutil.Process], seconds: float) -> list[str]:
    _, alive = psutil.wait_procs(procs, timeout=seconds)
    survivors = [f"{p.pid} {command(p)[:120]}" for p in alive]
    for p in alive:
        p.kill()
    return survivors


def check_resumed_like_the_reference(run, reference, resumed_from):
    starts = [r for r in RunDir(run).read_launches() if r["event"] == "start"]
    ends = [r for r in RunDir(run).read_launches() if r["event"] == "end"]
    assert [s["resumed_from_step"] for s in starts] == [None, resumed_from]
    # The second launch really resumed: it ran only the steps after the checkpoint.
    assert ends[-1]["outcome"] == "done" and ends[-1]["steps_run"] == TOTAL_STEPS - resumed_from
    assert losses(metrics(run)) == losses(metrics(reference))
    assert evals(run) == evals(reference)


def newest_checkpoint_step(run) -> int:
    """What --resume auto will pick (a save cut off before its rename counts: it is finished)."""
    complete = [p for p in (run / "checkpoints").glob("*step-*") if read_meta(p) is not None]
    return max(int(p.name.rsplit("-", 1)[1]) for p in complete)


def test_a_second_training_on_a_run_dir_in_use_stops_before_any_work(shards, tmp_path):
    run = tmp_path / "run"
    holder = RunLock(run)
    holder.acquire()  # this test process plays the training that owns the run dir
    result = accelerate_launch(TRAIN, *train_args(shards, run, *RUN), "--resume", "auto", num_processes=1)
    assert result.returncode != 0
    assert f"run directory {run} is in use by pid {os.getpid()} on " in result.stderr
    assert not re.search(r'File ".*/(cmr|launch)/', result.stderr), result.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
    holder.release()


def test_one_owner_and_no_process_outlives_a_killed_launcher(shards, reference, tmp_path):
    run = tmp_path / "run"
    process = launch(shards, run, *RUN)
    launcher = psutil.Process(process.pid)
    wait_until(reached(run, 2), process, what="step 2")
    rank0 = next(r for r in ranks_of(launcher) if r.environ().get("RANK") == "0")
    with pytest.raises(RunDirBusy, match=f"in use by pid {rank0.pid} on "):
        RunLock(run).acquire()  # rank 0 holds the run dir
    # kill -9 of the launcher only: the ranks (own sessions), their workers and trackers go too.
    wait_until(reached(run, 8), process, what="step 8")
    procs, helpers = tree(launcher), [helpers_of(r) for r in ranks_of(launcher)]
    launcher.kill()
    killed_at = metrics(run)[-1]["step"]
    # Each rank had its reward worker and DataLoader workers (train, next epoch, eval).
    assert len(helpers) == 2 and all(len(h) >= 4 for h in helpers), [command(p) for p in procs]
    process.wait()
    assert gone_within(procs, 10) == []
    # The lock went with its holder: --resume auto just works, and equals the reference.
    resumed_from = newest_checkpoint_step(run)
    assert resumed_from <= killed_at < TOTAL_STEPS
    ok(accelerate_launch(TRAIN, *train_args(shards, run, *RUN), "--resume", "auto"))
    check_resumed_like_the_reference(run, reference, resumed_from)


def test_a_machine_crash_kills_every_process_and_resume_equals_the_reference(shards, reference, tmp_path):
    run = tmp_path / "run"
    process = launch(shards, run, *RUN)
    launcher = psutil.Process(process.pid)
    wait_until(reached(run, 22), process, what="step 22")
    procs = [launcher, *tree(launcher)]
    for p in procs:  # as at a power cut: no process gets to react to another's death
        p.kill()
    process.wait()
    assert gone_within(procs, 10) == []
    resumed_from = newest_checkpoint_step(run)
    ok(accelerate_launch(TRAIN, *train_args(shards, run, *RUN), "--resume", "auto"))
    check_resumed_like_the_reference(run, reference, resumed_from)


def test_a_stopped_rank_fails_the_others_within_the_collective_timeout(shards, tmp_path):
    run, timeout = tmp_path / "run", 15
    # Batches of 2: 60 steps, so the run is still going when rank 1 stops.
    process = launch(shards, run, "data.batch_size=2", f"train.collective_timeout_s={timeout}")
    launcher = psutil.Process(process.pid)
    wait_until(reached(run, 3), process, what="step 3")
    rank1 = next(r for r in ranks_of(launcher) if r.environ().get("RANK") == "1")
    procs = tree(launcher)
    rank1.suspend()  # SIGSTOP: alive, holding its sockets, answering nothing
    stopped = time.time()
    try:
        output = process.communicate(timeout=timeout + 90)[0]
        elapsed = time.time() - stopped
    finally:
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    assert process.returncode != 0
    assert f"rank 1 (pid {rank1.pid} on " in output and "stopped responding" in output, output[-4000:]
    assert f"train.collective_timeout_s={timeout}" in output
    # The collective gives up after the timeout; naming the silent rank takes a few seconds more.
    assert elapsed < timeout + 45, elapsed


def test_sigusr1_checkpoints_requeues_and_the_rerun_resumes_like_the_reference(shards, reference, tmp_path):
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    (stub_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (stub_dir / "scontrol").chmod(0o755)
    env = cpu_env(SLURM_JOB_ID="4242", PATH=f"{stub_dir}{os.pathsep}{os.environ['PATH']}")
    run = tmp_path / "run"
    process = launch(shards, run, *RUN, env=env)
    wait_until(reached(run, 3), process, what="step 3")
    ranks_of(psutil.Process(process.pid))[0].send_signal(signal.SIGUSR1)  # one rank hears it; all stop
    output = process.communicate(timeout=180)[0]
    assert process.returncode == 0, output[-4000:]
    assert "training preempted" in output and "SLURM job 4242 restart 0" in output
    assert calls.read_text().split() == ["requeue", "4242"]
    stopped_at = metrics(run)[-1]["step"]
    assert stopped_at < TOTAL_STEPS and read_meta(run / "checkpoints" / f"step-{stopped_at:08d}") is not None
    ok(accelerate_launch(TRAIN, *train_args(shards, run, *RUN), "--resume", "auto",
                         env=cpu_env(SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="1")))
    check_resumed_like_the_reference(run, reference, stopped_at)
    assert [s["slurm_restart_count"] for s in RunDir(run).read_launches() if s["event"] == "start"] == [0, 1]
