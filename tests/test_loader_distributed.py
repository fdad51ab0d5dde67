"""Exactly-once delivery and resume across 2 real processes x 2 workers (accelerate launch, gloo)."""

import json
from collections import Counter

import pytest

from tests.launch import REPO, accelerate_launch
from tests.servers import ShardServer
from tests.tiny_data import write_split

WORKER = REPO / "tests" / "dist" / "loader_worker.py"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]
NUM_SAMPLES = 61  # 61 = 3 batches x 2 ranks x 4 x ... + a remainder that must be dropped


def load(prefix, rank):
    return json.loads((prefix.parent / f"{prefix.name}.rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    write_split(root, "train", NUM_SAMPLES, shard_size=5)
    return root


def check(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def full(shards, tmp_path_factory):
    """2 ranks x 2 workers, 2 epochs from the local directory, uninterrupted: what the other
    runs are compared with."""
    out = tmp_path_factory.mktemp("full") / "run"
    check(accelerate_launch(WORKER, "--shards", str(shards), "--out", str(out), "--epochs", "2"))
    return out


def test_two_ranks_two_workers_exactly_once_and_equal_batches(full):
    ranks = [load(full, r) for r in range(2)]
    assert {r["world"] for r in ranks} == {2}
    for epoch in ("0", "1"):
        steps = [r["epochs"][epoch]["steps"] for r in ranks]
        assert steps[0] == steps[1] == ranks[0]["epochs"][epoch]["len"] == NUM_SAMPLES // 8
        seen = Counter(i for r in ranks for i in r["epochs"][epoch]["ids"])
        assert max(seen.values()) == 1, "a sample was delivered twice in one epoch"
        assert len(seen) == (NUM_SAMPLES // 8) * 8
    # The ranks really read different data, and the order changes with the epoch.
    assert not set(ranks[0]["epochs"]["0"]["ids"]) & set(ranks[1]["epochs"]["0"]["ids"])
    assert ranks[0]["epochs"]["0"]["ids"] != ranks[0]["epochs"]["1"]["ids"]


def test_resume_mid_epoch_gets_exactly_the_rest(shards, full, tmp_path):
    part, rest = tmp_path / "part", tmp_path / "rest"
    check(accelerate_launch(WORKER, "--shards", str(shards), "--out", str(part), "--epochs", "2",
                            "--stop-after", "3"))
    check(accelerate_launch(WORKER, "--shards", str(shards), "--out", str(rest), "--epochs", "2",
                            "--resume", f"{part}.state"))
    for rank in range(2):
        whole = load(full, rank)["epochs"]["1"]["ids"]
        head = load(part, rank)["epochs"]["1"]["ids"]
        tail = load(rest, rank)["epochs"]["1"]["ids"]
        assert len(head) == 3 * 4
        assert head + tail == whole


def test_shards_over_http_give_the_same_batches_bit_for_bit(shards, full, tmp_path):
    """2 processes x 2 workers over 2 epochs from a real HTTP server: the batches of the
    local directory, byte for byte, every sample once."""
    remote = tmp_path / "http"
    with ShardServer(shards) as server:
        # Three connections cut on the way (fewer than data.max_retries: nothing is lost).
        drops = server.faults.drop_after(5000, path="train/*.tar", p=0.5, seed=3, times=3)
        check(accelerate_launch(WORKER, "--shards", server.url, "--out", str(remote), "--epochs", "2"))
        tars = {p for m, p in server.requests if m == "GET" and p.endswith(".tar")}
    assert len(tars) == len(list((shards / "train").glob("*.tar")))  # it really read over http
    assert drops.applied == 3
    for rank in range(2):
        assert load(remote, rank)["epochs"] == load(full, rank)["epochs"]
