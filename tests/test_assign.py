"""The epoch plan, simulated at cluster scale without processes."""

import random
from collections import Counter

import numpy as np
import pytest

from cmr.data.assign import plan_epoch, shard_order, worker_batch_counts


def covered(plan, sizes):
    """Every (shard, sample) position the plan hands out, with multiplicity."""
    seen = np.zeros(sum(sizes), dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for slot in plan.slots:
        for p in slot.pieces:
            assert 0 <= p.start < p.stop <= sizes[p.shard]
            seen[starts[p.shard] + p.start : starts[p.shard] + p.stop] += 1
    return seen


def check_train_plan(plan, sizes, world, workers, batch, multiple=1):
    seen = covered(plan, sizes)
    assert seen.max() == 1, "a sample was handed out twice"
    assert int(seen.sum()) + plan.num_dropped == sum(sizes)
    assert plan.num_dropped < world * batch * multiple, "more dropped than one batch per rank"
    per_rank = Counter()
    for slot in plan.slots:
        assert slot.num_samples == slot.num_batches * batch
        per_rank[slot.rank] += slot.num_batches
    assert set(per_rank.values()) == {plan.num_batches_per_rank}
    assert len(per_rank) == world


def test_cluster_scale_1024_ranks_8_workers_100k_shards():
    rng = random.Random(0)
    sizes = [rng.randint(900, 1100) for _ in range(100_000)]
    world, workers, batch = 1024, 8, 64
    plan = plan_epoch(sizes, world_size=world, num_workers=workers, batch_size=batch, seed=3, epoch=7)
    check_train_plan(plan, sizes, world, workers, batch)
    # Balance: every worker's batch count differs by at most one within a rank.
    for rank in range(world):
        counts = [plan.slot(rank, w).num_batches for w in range(workers)]
        assert max(counts) - min(counts) <= 1
    # Each shard is read by at most two slots per boundary it holds (no hot shards).
    readers = Counter(p.shard for s in plan.slots for p in s.pieces)
    assert max(readers.values()) <= 3


@pytest.mark.parametrize("world,workers,batch", [(1, 1, 8), (2, 2, 4), (3, 2, 5), (4, 3, 7), (8, 4, 2)])
def test_train_plan_exact_coverage_and_equal_batches(world, workers, batch):
    rng = random.Random(world * 100 + workers)
    sizes = [rng.randint(0, 30) for _ in range(13)]  # includes empty shards
    for epoch in range(3):
        plan = plan_epoch(sizes, world_size=world, num_workers=workers, batch_size=batch, seed=1, epoch=epoch)
        check_train_plan(plan, sizes, world, workers, batch)


@pytest.mark.parametrize("world,workers,batch", [(1, 1, 8), (2, 2, 4), (3, 2, 5), (5, 3, 7)])
def test_eval_plan_covers_everything_once_with_padding(world, workers, batch):
    sizes = [7, 0, 19, 3, 11]
    plan = plan_epoch(sizes, world_size=world, num_workers=workers, batch_size=batch, seed=0, epoch=0, mode="eval")
    seen = covered(plan, sizes)
    assert (seen == 1).all(), "eval must deliver every sample exactly once"
    assert plan.num_dropped == 0
    assert plan.num_padded == world * plan.num_batches_per_rank * batch - sum(sizes)
    for rank in range(world):
        assert sum(plan.slot(rank, w).num_batches for w in range(workers)) == plan.num_batches_per_rank


def test_more_slots_than_shards_still_exact():
    sizes = [50, 50]
    plan = plan_epoch(sizes, world_size=4, num_workers=4, batch_size=3, seed=0, epoch=0)
    check_train_plan(plan, sizes, 4, 4, 3)


def test_shard_order_depends_on_seed_and_epoch_only():
    assert shard_order(1000, 1, 2) == shard_order(1000, 1, 2)
    assert shard_order(1000, 1, 2) != shard_order(1000, 1, 3)
    assert shard_order(1000, 1, 2) != shard_order(1000, 2, 2)
    assert sorted(shard_order(1000, 1, 2)) == list(range(1000))
    assert shard_order(5, 1, 2, shuffle=False) == [0, 1, 2, 3, 4]


def test_dropped_samples_change_between_epochs():
    sizes = [10] * 10
    tails = set()
    for epoch in range(5):
        plan = plan_epoch(sizes, world_size=2, num_workers=1, batch_size=7, seed=0, epoch=epoch)
        seen = covered(plan, sizes)
        tails.add(tuple(np.flatnonzero(seen == 0)))
    assert len(tails) > 1


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match=r"10 samples are fewer than one batch per rank \(2 ranks x batch 8 = 16\)"):
        plan_epoch([10], world_size=2, num_workers=1, batch_size=8, seed=0, epoch=0)


def test_worker_batch_counts_match_round_robin():
    for total in range(20):
        counts = worker_batch_counts(total, 3)
        assert sum(counts) == total
        order = [i % 3 for i in range(total)]
        assert [order.count(w) for w in range(3)] == counts


def test_batch_multiple_makes_epochs_end_on_an_optimizer_step():
    sizes = [37, 41, 29]  # 107 samples
    plan = plan_epoch(sizes, world_size=2, num_workers=2, batch_size=4, seed=0, epoch=0, batch_multiple=3)
    assert plan.num_batches_per_rank == 12  # 107 // 8 = 13 -> 12
    check_train_plan(plan, sizes, 2, 2, 4, multiple=3)
    with pytest.raises(ValueError, match=r"2 ranks x batch 4 x 3 accumulation steps = 24\)"):
        plan_epoch([20], world_size=2, num_workers=1, batch_size=4, seed=0, epoch=0, batch_multiple=3)
