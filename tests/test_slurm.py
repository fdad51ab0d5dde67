"""launch/slurm/train.sbatch on a real SLURM cluster: two nodes (two slurmd on this machine,
tests/slurm_cluster.py), one CPU training process per node over gloo, the tiny config.

Each test submits the project's own script with `sbatch` and drives the job with SLURM's own
commands (scancel, scontrol), as a user and the scheduler would.
"""

import os
import sys
from pathlib import Path

import pytest

from cmr.run_dir import RunDir
from tests.launch import REPO, accelerate_launch, cpu_env, ok
from tests.slurm_cluster import NODES, SlurmCluster, missing_programs
from tests.test_train import TRAIN, losses, metrics, train_args
from tests.tiny_data import write_split

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.slow]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
TOTAL_STEPS = 15


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
    root = tmp_path_factory.mktemp("slurm_shards")
    write_split(root, "train", 24, shard_size=6)
    write_split(root, "val", 12, shard_size=6)
    return root


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


def test_two_nodes_train_to_the_end_with_the_losses_of_two_local_processes(cluster, shards, reference, tmp_path):
    run = tmp_path / "run"
    job_id, log = submit(cluster, shards, run)
    job = cluster.wait_job(job_id, ENDED)
    assert job["JobState"] == "COMPLETED", log.read_text()[-4000:]
    assert job["NodeList"] == "node[1-2]"
    assert f"job {job_id} (restart 0) on 2 nodes" in log.read_text()
    records = metrics(run)
    assert records[-1]["step"] == TOTAL_STEPS
    assert losses(records) == losses(metrics(reference))
    [launch] = starts(run)
    assert (launch["slurm_job_id"], launch["slurm_restart_count"], launch["world_size"]) == (job_id, 0, 2)


def starts(run: Path) -> list[dict]:
    return [r for r in RunDir(run).read_launches() if r["event"] == "start"]
