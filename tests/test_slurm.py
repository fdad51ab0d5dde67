"""launch/slurm/train.sbatch on a real SLURM cluster: two nodes (two slurmd on this machine,
tests/slurm_cluster.py), one CPU training process per node over gloo, the tiny config.

Each test submits the project's own script with `sbatch` and drives the job with SLURM's own
commands (scancel, scontrol), as a user and the scheduler would.
"""

import os
import sys
from pathlib import Path

import pytest

from tests.slurm_cluster import NODES, SlurmCluster, missing_programs

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.slow]


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
