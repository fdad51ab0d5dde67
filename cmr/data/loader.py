"""What the trainer holds: a resumable loader per split, its skip counters, the vocabulary."""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # noqa: F401 - its exit handler registers first, so ours runs before it
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from cmr.config import ConfigError
from cmr.data.assign import worker_batch_counts
from cmr.data.batch import Batch
from cmr.data.decode import BadSample, parse_text
from cmr.data.pipeline import DataConfig, ShardStream
from cmr.data.remote import redact
from cmr.data.source import DataError, ShardSet, describe
from cmr.data.tario import read_members
from cmr.data.vocab import Vocabulary
from cmr.glove import load_glove_words
from cmr.procs import WorkerInit


class StreamingLoader:
    """Iterates one epoch of a rank's batches; knows its position and what it skipped.

    Usage::

        for epoch in range(start_epoch, num_epochs):
            loader.set_epoch(epoch)
            for batch in loader:
                ...
        state = loader.state_dict()          # save with the checkpoint
        loader.load_state_dict(state)        # continue mid-epoch, exactly

    ``skip_counts`` holds this rank's skipped samples by reason (all workers together),
    ``num_seen`` the raw samples behind them; the trainer all-reduces both for logging.
    """

    def __init__(self, dataset: ShardStream):
        self.dataset = dataset
        self.cfg = dataset.cfg
        self.epoch = 0
        self.windows_done: list[int] = [0] * dataset.num_loader_workers
        self.skip_counts: Counter = Counter()
        self.num_seen = 0
        self.num_dropped = 0  # train: remainder samples left out (not errors)
        # Epochs the trainer will run (set by it): no look-ahead past the last one.
        self.end_epoch: int | None = None
        # Training with workers and prefetch_next_epoch: two lanes (a dataset copy with its own
        # shared control + a persistent DataLoader) take turns, so the next epoch's workers
        # fill their shuffle buffers and decode their first batches while this epoch runs.
        lookahead = dataset.mode == "train" and self.cfg.num_workers > 0 and self.cfg.prefetch_next_epoch
        self._lanes: list[_Lane] = [_Lane(dataset)] + ([_Lane(dataset.copy())] if lookahead else [])
        self._lane = 0  # the lane that serves the current epoch
        self._ahead: tuple[int, Iterator[Batch]] | None = None  # (epoch, its started iterator)

    def close(self) -> None:
        """Stop this loader's workers now (they persist across epochs). Also done at exit for
        every loader still open, before multiprocessing would wait on them forever."""
        self._ahead = None
        for lane in self._lanes:
            lane.close()

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.windows_done = [0] * self.dataset.num_loader_workers

    def __len__(self) -> int:
        return self.dataset.num_batches()

    @property
    def batches_done(self) -> int:
        return sum(self.windows_done)

    def __iter__(self) -> Iterator[Batch]:
        if self.dataset.mode == "eval":
            self.windows_done = [0] * self.dataset.num_loader_workers  # every pass is whole
        if self.batches_done == 0 and self.dataset.mode == "train" and not self.cfg.resampled:
            self.num_dropped += self.dataset.plan(self.epoch).num_dropped
        for batch in _named_worker_failures(self._start_epoch(), self.cfg):
            self.windows_done[batch.worker] = batch.window + 1
            self.num_seen += batch.num_samples + sum(batch.skipped.values())
            self.skip_counts.update(batch.skipped)
            self._check_bad_fraction()
            yield batch

    def _start_epoch(self) -> Iterator[Batch]:
        """This epoch's batches from its current position: the iterator started ahead when it
        is for this epoch from its start, else a fresh one; then start the next epoch ahead."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == self.epoch and self.batches_done == 0:
            self._lane = (self._lane + 1) % len(self._lanes)
            iterator = ahead[1]
        else:  # nothing ahead, or a seek/resume since: the next epoch's lane is free again
            iterator = self._lanes[self._lane].start(self.epoch, self.windows_done)
        next_epoch = self.epoch + 1
        if len(self._lanes) > 1 and (self.end_epoch is None or next_epoch < self.end_epoch):
            other = self._lanes[(self._lane + 1) % len(self._lanes)]
            self._ahead = (next_epoch, other.start(next_epoch, [0] * len(self.windows_done)))
        return iterator

    def _check_bad_fraction(self) -> None:
        num_bad = sum(self.skip_counts.values())
        if self.num_seen < self.cfg.min_samples_for_bad_check or num_bad == 0:
            return
        if num_bad / self.num_seen > self.cfg.max_bad_fraction:
            reasons = ", ".join(f"{k}={v}" for k, v in self.skip_counts.most_common())
            raise DataError(
                f"{num_bad} of {self.num_seen} samples were unusable ({reasons}), more than "
                f"data.max_bad_fraction={self.cfg.max_bad_fraction}; {_check_hint(self.dataset.shardset)}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "windows_done": list(self.windows_done),
            "batches_done": self.batches_done,
            "samples_consumed": self.batches_done * self.cfg.batch_size * self.dataset.world_size,
            "world_size": self.dataset.world_size,
            "num_workers": self.dataset.num_loader_workers,
            "skip_counts": dict(self.skip_counts),
            "num_seen": self.num_seen,
            "num_dropped": self.num_dropped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = (state["world_size"], state["num_workers"])
        now = (self.dataset.world_size, self.dataset.num_loader_workers)
        epoch, done = state["epoch"], state["batches_done"]
        if saved != now and 0 < done < self._num_batches_of(saved[0]):
            raise DataError(
                f"cannot continue mid-epoch with {now[0]} ranks x {now[1]} workers: the checkpoint "
                f"was written with {saved[0]} x {saved[1]} (use the same data.num_workers and "
                f"process count, or resume from an end-of-epoch checkpoint)"
            )
        self.epoch = epoch
        self.windows_done = list(state["windows_done"]) if saved == now else [0] * now[1]
        if saved != now and done:  # the saved epoch was complete: go on with the next one
            self.epoch += 1
        self.skip_counts = Counter(state.get("skip_counts", {}))
        self.num_seen = state.get("num_seen", 0)
        self.num_dropped = state.get("num_dropped", 0)

    def _num_batches_of(self, world_size: int) -> int:
        """Train batches per rank for another world size (the count does not depend on the
        number of workers or the epoch)."""
        total = self.cfg.samples_per_epoch if self.cfg.resampled else self.dataset.shardset.num_samples
        multiple = self.dataset.batch_multiple
        return total // (world_size * self.cfg.batch_size) // multiple * multiple

    def seek(self, epoch: int, batches_done: int) -> None:
        """Continue ``epoch`` after this rank's first ``batches_done`` batches (the position
        in samples is ``batches_done * batch_size * world_size``)."""
        counts = worker_batch_counts(batches_done, self.dataset.num_loader_workers)
        self.epoch = epoch
        self.windows_done = counts


class _Lane:
    """A dataset and the one DataLoader over it; its workers persist across epochs and read the
    epoch to plan from the dataset's shared-memory control."""

    def __init__(self, dataset: ShardStream):
        self.dataset = dataset
        cfg = dataset.cfg
        if cfg.num_workers and cfg.worker_start_method == "forkserver":
            # The forkserver imports the pipeline (torch, PIL, numpy) once; every worker after
            # that is a fork of a process that runs no threads: milliseconds, not seconds.
            multiprocessing.set_forkserver_preload(["cmr.data.pipeline"])
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=cfg.num_workers,
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
            persistent_workers=cfg.num_workers > 0,
            multiprocessing_context=cfg.worker_start_method if cfg.num_workers else None,
            worker_init_fn=WorkerInit() if cfg.num_workers else None,  # workers end with their rank
            timeout=cfg.worker_timeout_s if cfg.num_workers else 0,
            # Workers draw their base seed from this, not from the global torch RNG, so
            # starting an epoch (or resuming) leaves the trainer's random stream untouched.
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    def start(self, epoch: int, windows_done: list[int]) -> Iterator[Batch]:
        """Set the control, then create the iterator: its workers begin reading at once."""
        self.dataset.epoch = epoch
        self.dataset.skip_windows = dict(enumerate(windows_done))
        self.dataset.worker_offset = sum(windows_done) % self.dataset.num_loader_workers
        iterator = iter(self.loader)
        if self.dataset.cfg.num_workers:
            _open_lanes.add(self)
            _worker_pids.update(w.pid for w in getattr(iterator, "_workers", ()))
        return iterator

    def close(self) -> None:
        """Stop the workers: the done signal, a few seconds to finish, then SIGKILL. Not
        SIGTERM: workers ignore it (``procs.serve``), it is SLURM's to the whole job step, and
        multiprocessing's exit handler, which sends it and then joins, would wait forever."""
        iterator, self.loader._iterator = self.loader._iterator, None  # the persistent workers' iterator
        if iterator is None or not hasattr(iterator, "_shutdown_workers"):
            return
        iterator._shutdown_workers()  # done event, joins each worker for up to 5 s
        for worker in iterator._workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)
        _worker_pids.difference_update(w.pid for w in iterator._workers if not w.is_alive())
        _open_lanes.discard(self)


# Lanes whose workers may be running. Registered after multiprocessing's own exit handler
# (imported above), so this runs before it: a loader still referenced at exit (a
# global, a traceback's frame after an error) must not leave the interpreter joining workers
# that ignore SIGTERM.
_open_lanes: weakref.WeakSet[_Lane] = weakref.WeakSet()
# Every loader worker this process started (pids): the exit handler kills those still there,
# and only those (a user's own multiprocessing children are theirs to end).
_worker_pids: set[int] = set()


@atexit.register
def _close_open_lanes() -> None:
    for lane in list(_open_lanes):
        lane.close()
    # A worker of a loader collected earlier that never took its done signal (stuck on a dead
    # mount): torch sent it SIGTERM, in vain. Workers are daemonic: they end with us anyway.
    for child in multiprocessing.active_children():
        if child.pid in _worker_pids:
            child.kill()


def _named_worker_failures(batches: Iterator[Batch], cfg: DataConfig) -> Iterator[Batch]:
    """A worker that sends nothing for ``worker_timeout_s`` becomes a DataError that names
    the workers and whether they are alive, not an endless wait."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError as err:
            if "timed out" not in str(err):
                raise
            workers = getattr(iterator, "_workers", None) or []
            states = ", ".join(f"pid {w.pid} {'alive' if w.is_alive() else 'gone'}" for w in workers)
            raise DataError(
                f"no batch from the data workers in {cfg.worker_timeout_s:g} s (data.worker_timeout_s)"
                + (f"; workers: {states}" if states else "") + "; a slow remote store needs a larger "
                "data.worker_timeout_s, a stuck one data.io_timeout_s"
            ) from None
        yield batch


def _check_hint(shardset: ShardSet) -> str:
    """How to look into the shards: validate, where there is a manifest to check them by."""
    if shardset.manifest is None:
        return "the shards have no manifest to validate them against; look into them with `tar -tvf`"
    split_dir = shardset.split_dir
    if shardset.is_remote:
        dataset = redact(str(split_dir).split("?", 1)[0].rstrip("/").rsplit("/", 1)[0])
    else:
        dataset = str(Path(split_dir).parent)
    return f"check the shards with `python -m shards validate {dataset}`"


def collect_captions(shardset: ShardSet) -> list[str]:
    """All captions of a split, reading only the text members of each tar."""
    captions: list[str] = []
    for path in shardset.paths:
        groups: dict[str, dict] = {}
        for key, ext, data in read_members(path, ("json", "txt"), shardset.opener):
            groups.setdefault(key, {})[ext] = data
        for group in groups.values():
            try:
                captions.extend(parse_text(group)[0])
            except BadSample:
                continue  # counted when the loader meets the sample
    return captions


def build_vocabulary(cfg: DataConfig, glove: str | None = None) -> Vocabulary:
    """The vocabulary of the training split's captions (save it with the run), extended by
    ``cfg.vocab.glove_extra_words`` words of ``glove`` (``model.text_encoder.glove``)."""
    captions = collect_captions(cfg.open_split(cfg.train_split))
    if not captions:
        raise DataError(f"no readable captions in {describe(cfg.shards, cfg.train_split)}")
    glove_words = None
    if cfg.vocab.glove_extra_words > 0:
        if glove is None:
            raise ConfigError("data.vocab.glove_extra_words", "needs model.text_encoder.glove set")
        try:
            glove_words = load_glove_words(glove)
        except (OSError, ValueError, ImportError) as err:
            raise ConfigError("model.text_encoder.glove", str(err)) from None
    return Vocabulary.build(captions, cfg.vocab, glove_words)


def build_loader(
    cfg: DataConfig,
    vocab: Vocabulary,
    *,
    split: str,
    mode: Literal["train", "eval"],
    rank: int = 0,
    world_size: int = 1,
    batch_multiple: int = 1,
) -> StreamingLoader:
    """A loader for one split; fails early with a clear message when the data can't work.

    ``batch_multiple``: training epochs hold a multiple of this many batches per rank (the
    gradient accumulation steps, so every epoch ends on an optimizer step)."""
    shardset = cfg.open_split(split)
    dataset = ShardStream(shardset, cfg, vocab, rank=rank, world_size=world_size, mode=mode,
                          batch_multiple=batch_multiple)
    if mode == "train" and not cfg.resampled:
        try:
            dataset.plan()
        except ValueError as err:
            raise DataError(f"{describe(cfg.shards, split)}: {err}; lower data.batch_size") from None
    return StreamingLoader(dataset)
