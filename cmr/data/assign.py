"""Who reads what: the per-epoch plan that splits a sharded dataset over ranks x workers.

Pure functions, no I/O, so the plan for 1,024 ranks x 8 workers over 100,000 shards can be
checked in a unit test. Every (rank, worker) *slot* computes the same plan from the same
inputs and reads only its own part, so no coordination between processes is needed.

How a plan is made:

1. The shard list is permuted with a generator seeded by ``(seed, epoch)``.
2. The permuted shards are laid end to end as one stream of samples.
3. The stream is cut into one contiguous range per slot. Ranges are whole multiples of the
   batch size, so a slot's ``k``-th batch is exactly its raw samples ``[k*B, (k+1)*B)``: a
   batch is a fixed *window* of the stream, which makes resuming exact and cheap (skip
   windows without decoding them).

Train mode keeps ``num_batches = S // (world * B)`` batches per rank (equal on every rank,
so no rank runs out early and hangs a collective) and drops the remaining
``S - world * num_batches * B`` samples, which are counted and land at the tail of the
permuted stream (so different samples are dropped each epoch). Eval mode delivers every
sample: each rank gets ``S / world`` (+-1) samples cut into ``ceil(max / B)`` batches and the
holes are padding that the batch marks as masked. Nothing is ever repeated.

A range may start or end inside a shard; then two slots read the same shard file and each
keeps its own part. So fewer shards than slots works (it only costs some re-reading).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools

import numpy as np


@dataclasses.dataclass(frozen=True)
class Piece:
    """Samples ``[start, stop)`` of shard number ``shard`` (an index into the shard list)."""

    shard: int
    start: int
    stop: int

    @property
    def num_samples(self) -> int:
        return self.stop - self.start


@dataclasses.dataclass(frozen=True)
class SlotPlan:
    rank: int
    worker: int
    pieces: tuple[Piece, ...]
    num_batches: int
    num_samples: int  # real samples in the pieces; eval pads up to num_batches * batch_size


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    epoch: int
    world_size: int
    num_workers: int
    batch_size: int
    num_batches_per_rank: int
    num_dropped: int  # train: samples left out this epoch (counted, never repeated)
    num_padded: int  # eval: masked padding rows added over all ranks
    slots: tuple[SlotPlan, ...]  # index = rank * num_workers + worker

    def slot(self, rank: int, worker: int) -> SlotPlan:
        return self.slots[rank * self.num_workers + worker]


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """A permutation of the shard indices, the same in every process for ``(seed, epoch)``."""
    if not shuffle:
        return list(range(num_shards))
    rng = np.random.Generator(np.random.PCG64([seed, epoch, 0x5EED]))
    return rng.permutation(num_shards).tolist()


def worker_batch_counts(num_batches: int, num_workers: int) -> list[int]:
    """Batches per worker so that DataLoader's round robin (batch i from worker i % n) holds."""
    base, extra = divmod(num_batches, num_workers)
    return [base + (w < extra) for w in range(num_workers)]


def _cut(order: list[int], sizes: list[int], start: int, stop: int, offsets: list[int]) -> tuple[Piece, ...]:
    """Pieces covering stream positions ``[start, stop)`` of the shards laid out in ``order``."""
    pieces = []
    i = bisect.bisect_right(offsets, start) - 1
    pos = start
    while pos < stop:
        shard_begin = offsets[i]
        shard_end = shard_begin + sizes[order[i]]
        end = min(stop, shard_end)
        if end > pos:
            pieces.append(Piece(order[i], pos - shard_begin, end - shard_begin))
        pos = end
        i += 1
    return tuple(pieces)


def plan_epoch(
    shard_sizes: list[int],
    *,
    world_size: int,
    num_workers: int,
    batch_size: int,
    seed: int,
    epoch: int,
    mode: str = "train",
    shuffle: bool = True,
    batch_multiple: int = 1,
) -> EpochPlan:
    """The plan of one epoch; see the module docstring. ``num_workers`` counts a main-process
    loader as 1. In train mode the batches per rank are rounded down to a multiple of
    ``batch_multiple`` (gradient accumulation: an epoch ends on an optimizer step)."""
    if world_size < 1 or num_workers < 1 or batch_size < 1:
        raise ValueError("world_size, num_workers and batch_size must be >= 1")
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    order = shard_order(len(shard_sizes), seed, epoch, shuffle)
    offsets = [0, *itertools.accumulate(shard_sizes[s] for s in order)]
    total = offsets[-1]
    if mode == "train":
        per_rank = total // (world_size * batch_size) // batch_multiple * batch_multiple
        if per_rank == 0:
            need = world_size * batch_size * batch_multiple
            raise ValueError(
                f"{total} samples are fewer than one batch per rank "
                f"({world_size} ranks x batch {batch_size}"
                + (f" x {batch_multiple} accumulation steps" if batch_multiple > 1 else "")
                + f" = {need})"
            )
        rank_starts = [r * per_rank * batch_size for r in range(world_size + 1)]
        dropped, padded = total - world_size * per_rank * batch_size, 0
    else:
        rank_starts = [r * total // world_size for r in range(world_size + 1)]
        largest = max(b - a for a, b in zip(rank_starts, rank_starts[1:]))
        per_rank = -(-largest // batch_size)
        dropped, padded = 0, world_size * per_rank * batch_size - total

    slots = []
    for rank in range(world_size):
        pos, rank_stop = rank_starts[rank], rank_starts[rank + 1]
        for worker, num_batches in enumerate(worker_batch_counts(per_rank, num_workers)):
            stop = min(pos + num_batches * batch_size, rank_stop)
            pieces = _cut(order, shard_sizes, pos, stop, offsets)
            slots.append(SlotPlan(rank, worker, pieces, num_batches, stop - pos))
            pos = stop
    return EpochPlan(
        epoch=epoch,
        world_size=world_size,
        num_workers=num_workers,
        batch_size=batch_size,
        num_batches_per_rank=per_rank,
        num_dropped=dropped,
        num_padded=padded,
        slots=tuple(slots),
    )


def resampled_shards(num_shards: int, seed: int, epoch: int, rank: int, worker: int):
    """Endless shard indices drawn with replacement, for data too large to plan exactly.

    Each slot has its own stream; epochs are a fixed number of batches, not a pass over the
    data, so a sample may be seen zero or several times per epoch (that is the point).
    """
    rng = np.random.Generator(np.random.PCG64([seed, epoch, rank, worker, 0xD1CE]))
    while True:
        yield int(rng.integers(num_shards))
