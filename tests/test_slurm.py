"""launch/slurm/train.sbatch on a real SLURM cluster: two nodes (two slurmd on this machine,
tests/slurm_cluster.py), one CPU training process per node over gloo, the tiny config.

Each test submits the project's own script with `sbatch` and drives the job with SLURM's own
commands (scancel, scontrol), as a user and the scheduler would.
"""

import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from cmr.run_dir import RunDir
from tests.launch import REPO, accelerate_launch, cpu_env, ok
from tests.slurm_cluster import NODES, SlurmCluster, missing_programs
from tests.test_train import TRAIN, losses, metrics, train_args
from tests.tiny_data import train_val_shards

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.slow]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_programs()
    if missing:
        pytest.skip(f"SLURM not installed (missing {', '.join(missing)}): `make slurm` installs slurm-wlm and munge")
    if os.geteuid() != 0:
        pytest.skip("the test cluster's slurmd must run as root (it starts jobs as their user)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_the_cluster_has_two_idle_nodes(cluster):
    assert cluster.node_states() == {n: "idle" for n in NODES}


# 2 ranks x 4 a step, 3 steps an epoch, 5 epochs: 15 steps; a checkpoint every 4 steps.
RUN = ["data.batch_size=4", "train.checkpoint.every_n_steps=4"]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return train_val_shards(tmp_path_factory.mktemp("slurm_shards"), num_train=24)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """The same run under plain `accelerate launch` with 2 processes, never interrupted."""
    run = tmp_path_factory.mktemp("slurm_reference") / "run"
    ok(accelerate_launch(TRAIN, *train_args(shards, run, *RUN)))
    return run


def job_env() -> dict[str, str]:
    """What a user's shell passes on to the job: the project's environment active. Not
    ACCELERATE_USE_CPU: on nodes without GPUs the script must set it itself."""
    env = cpu_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    del env["ACCELERATE_USE_CPU"], env["OMP_NUM_THREADS"]
    return env


def submit(cluster, shards, run: Path, *overrides: str, sbatch_args: tuple[str, ...] = ()) -> tuple[str, Path]:
    """launch/slurm/train.sbatch on 2 nodes, submitted from the repo root as its header says;
    returns the job id and its log."""
    log = run.parent / "job.out"
    job_id = cluster.sbatch("--nodes=2", f"--output={log}", "--job-name=cmr-test", *sbatch_args,
                            str(SBATCH), *train_args(shards, run, *RUN, *overrides), env=job_env(), cwd=REPO)
    return job_id, log


def starts(run: Path) -> list[dict]:
    return [r for r in RunDir(run).read_launches() if r["event"] == "start"]


def wait_for_step(cluster, job_id: str, run: Path, step: int, timeout: float = 240) -> int:
    """Until the job has logged ``step``; returns the newest step logged."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and (logged := metrics(run)) and logged[-1]["step"] >= step:
            return logged[-1]["step"]
        state = cluster.job(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job_id} {state} before step {step}"
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach step {step} in {timeout} s")


def test_usr1_from_slurm_checkpoints_requeues_the_same_job_and_resumes_bit_for_bit(cluster, shards, reference,
                                                                                   tmp_path):
    run = tmp_path / "run"
    job_id, log = submit(cluster, shards, run)
    signalled_after = wait_for_step(cluster, job_id, run, 5)
    # As SLURM preempts: SIGUSR1 to every process of the job, the batch shell included.
    cluster.run("scancel", "--signal=USR1", "--full", job_id)
    cluster.start_requeued_now(job_id)
    job = cluster.wait_job(job_id, ENDED)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED", text[-4000:]
    assert job["Restarts"] == "1", text[-4000:]
    first, second = starts(run)
    # The preempted launch recorded its end before asking for the requeue that kills it.
    ends = [r["outcome"] for r in RunDir(run).read_launches() if r["event"] == "end"]
    assert ends == ["preempted", "done"], RunDir(run).read_launches()
    assert (first["slurm_job_id"], first["slurm_restart_count"], first["resumed_from_step"]) == (job_id, 0, None)
    # A checkpoint at the step after the signal, not the last periodic one (step 4).
    assert (second["slurm_job_id"], second["slurm_restart_count"]) == (job_id, 1)
    assert signalled_after < second["resumed_from_step"] <= signalled_after + 3, (signalled_after, second)
    assert f"job {job_id} (restart 1) on 2 nodes" in text and f"SLURM job {job_id} restart 1" in text
    # Said (flushed) before scontrol: the requeue it asks for may kill rank 0 before "requeued
    # SLURM job" reaches the log, so that line is not waited for; Restarts == 1 is the requeue.
    assert "preempted (SIGUSR1): saved" in text and f"asking SLURM to requeue job {job_id}" in text
    # wandb's run ended before the requeue killed its service process (else rank 0's
    # end_training raised MailboxClosedError under the requeue).
    assert "[rank0]: Traceback" not in text and "MailboxClosedError" not in text, text[-6000:]
    # One metrics.jsonl, one wandb run, the whole loss sequence of the uninterrupted run.
    assert losses(metrics(run)) == losses(metrics(reference))
    wandb_runs = {p.name.rsplit("-", 1)[1] for p in run.rglob("offline-run-*")}
    assert wandb_runs == {RunDir(run).wandb_run_id()}


# 1,280 samples, 2 ranks x 2 a step: 320 steps an epoch, 1,600 steps (~30 s of training on 2 idle
# cores, after ~20 s of start), still running when a one-minute time limit warns (below).
LONG = ["data.batch_size=2"]
LONG_STEPS = 1600


@pytest.fixture(scope="module")
def long_shards(tmp_path_factory):
    return train_val_shards(tmp_path_factory.mktemp("slurm_long_shards"), num_train=1280)


@pytest.fixture(scope="module")
def long_reference(long_shards, tmp_path_factory):
    """Uninterrupted, without periodic checkpoints and wandb (a third faster; neither moves a
    loss, which the comparison with the job, which has both, checks too)."""
    run = tmp_path_factory.mktemp("slurm_long_reference") / "run"
    ok(accelerate_launch(TRAIN, *train_args(long_shards, run, *RUN, *LONG, "train.checkpoint.every_n_steps=0",
                                            "train.logging.wandb=false")))
    return run


def test_a_time_limit_warns_with_usr1_and_the_requeued_job_resumes_bit_for_bit(cluster, long_shards,
                                                                               long_reference, tmp_path):
    """`--time=1 --signal=USR1@10`, as the sbatch header's @120 does on a long job: once 10 s are
    left, at its next time-limit check (every 30 s, so 20-50 s into the job, once the ranks are
    up), SLURM sends SIGUSR1 to the step's processes (no B:, so not the batch shell). The run
    saves at the next step, ends its wandb run and requeues itself before the limit ends it."""
    run = tmp_path / "run"
    job_id, log = submit(cluster, long_shards, run, *LONG, sbatch_args=("--time=1", "--signal=USR1@10"))
    # The requeued run gets a limit it will not reach, or it would be warned again.
    cluster.start_requeued_now(job_id, "TimeLimit=10")
    job = cluster.wait_job(job_id, ENDED)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", text[-4000:]
    assert "DUE TO TIME LIMIT" not in text and "preempted (SIGUSR1)" in text, text[-4000:]
    # The ranks end cleanly, wandb's run included, before the requeue kills what is left (the
    # launchers: torch elastic prints their SIGTERM as a traceback of its own).
    assert "[rank0]: Traceback" not in text and "MailboxClosedError" not in text, text[-6000:]
    # Two nodes, one process each, trained to the end with the losses of two local processes.
    assert job["NodeList"] == "node[1-2]" and f"job {job_id} (restart 0) on 2 nodes" in text
    first, second = starts(run)
    assert (first["slurm_job_id"], first["world_size"], second["world_size"]) == (job_id, 2, 2)
    ends = [r["outcome"] for r in RunDir(run).read_launches() if r["event"] == "end"]
    assert ends == ["preempted", "done"], RunDir(run).read_launches()
    assert (first["slurm_restart_count"], second["slurm_restart_count"]) == (0, 1)
    assert 0 < second["resumed_from_step"] < LONG_STEPS, second
    assert metrics(run)[-1]["step"] == LONG_STEPS
    assert losses(metrics(run)) == losses(metrics(long_reference))


def processes_of(job_id: str, run: Path) -> list[psutil.Process]:
    """Every process on this machine that belongs to the job: SLURM_JOB_ID in its environment
    (the batch shell, srun, launchers, ranks, their workers) or the run dir on its command line."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("SLURM_JOB_ID") == job_id or str(run) in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return [p for p in found if p.pid != os.getpid() and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_scancel_ends_the_job_and_leaves_no_process_of_it(cluster, shards, tmp_path):
    run = tmp_path / "run"
    job_id, log = submit(cluster, shards, run)
    wait_for_step(cluster, job_id, run, 2)
    assert len([p for p in processes_of(job_id, run) if "train.py" in " ".join(p.cmdline())]) >= 2
    cluster.run("scancel", job_id)
    job = cluster.wait_job(job_id, ENDED, timeout=60)
    assert job["JobState"] == "CANCELLED", log.read_text()[-3000:]
    deadline = time.time() + 30  # KillWait (3 s), then SIGKILL; zombies reaped
    while (left := processes_of(job_id, run)) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, [(p.pid, " ".join(p.cmdline())[:200]) for p in left]
    cluster.wait_idle()
    time.sleep(5)  # not requeued by the trainer's SIGTERM path: cancelled (or purged), not pending
    assert cluster.job(job_id).get("JobState", "purged") in ("CANCELLED", "purged")


def test_a_lost_node_fails_the_other_within_the_collective_timeout_naming_its_rank(cluster, shards, tmp_path):
    run, timeout = tmp_path / "run", 20
    job_id, log = submit(cluster, shards, run, f"train.collective_timeout_s={timeout}")
    wait_for_step(cluster, job_id, run, 3)
    # Node 2 is lost: its slurmd, its step daemon and every task process on it, at once.
    on_node2 = [p for p in processes_of(job_id, run) if p.environ().get("SLURMD_NODENAME") == "node2"]
    stepds = {p.parent() for p in on_node2 if p.parent() and "slurmstepd" in p.parent().name()}
    lost_at = time.time()
    try:
        cluster.kill_slurmd("node2")
        for p in [*stepds, *on_node2]:
            p.kill()
        job = cluster.wait_job(job_id, ENDED + ("PENDING", "REQUEUED"), timeout=timeout + 90)
        failed_after = time.time() - lost_at
        text = log.read_text()
        assert "rank 1 (pid" in text and "stopped responding" in text, text[-4000:]
        assert f"train.collective_timeout_s={timeout}" in text
        assert failed_after < timeout + 60, failed_after
        # SLURM says why: the node failed (and --requeue puts the job back) or the step failed.
        assert job["JobState"] in ("NODE_FAIL", "FAILED", "PENDING", "REQUEUED"), job
        reason = cluster.run("scontrol", "show", "node", "node2").stdout
        assert "Not responding" in reason or "DOWN" in reason or job["JobState"] == "FAILED", reason
    finally:
        cluster.run("scancel", job_id, check=False)
        cluster.start_slurmd("node2")
        cluster.wait_idle(90)
