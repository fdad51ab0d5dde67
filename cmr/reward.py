"""BLEU rewards for self-critical sequence training, computed in CPU worker processes.

The trainer samples captions on the accelerator, hands them to :class:`RewardPool` with
``submit`` and keeps working (the next forward/backward) while worker processes score them;
``future.result()`` then gives the rewards. Reward of a sample = BLEU-4 of its sampled caption
against all reference captions of its image; baseline = BLEU-4 of its greedy caption (SCST's
self-critical baseline). Scores equal nltk's ``sentence_bleu`` (see :mod:`cmr.bleu`).

Workers are started with ``spawn`` (or ``forkserver``), never ``fork``: forking a process that
already runs torch's thread pools can deadlock the child. A worker that dies (OOM killer,
SIGKILL) surfaces as :class:`RewardPoolError` from ``result()``, every wait has a timeout, and
the next ``submit`` transparently starts fresh workers.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import chain
from typing import Literal

import numpy as np

from cmr.bleu import BleuBatch, check_smoothing, score_batch
from cmr.config import ConfigError
from cmr.procs import serve

log = logging.getLogger(__name__)


@dataclass
class RewardConfig:
    num_workers: int = 2  # reward processes; 0 scores inline in the calling process
    # nltk SmoothingFunction method. Sampled captions early in training often share no 4-gram
    # with any reference; unsmoothed BLEU-4 is then ~1e-78 whatever the lower orders say, so
    # all those samples get the same reward and no learning signal. method1 (a 0.1 count for
    # empty orders) keeps the ranking by the orders that do match.
    smoothing: str = "method1"
    max_n: int = 4  # BLEU-n with uniform weights 1/n
    timeout_s: float = 60.0  # longest wait for one batch's rewards before raising
    start_timeout_s: float = 120.0  # longest wait for new workers to start (spawn imports numpy)
    chunk_size: int = 0  # samples per worker task; 0 splits each batch evenly over the workers
    start_method: Literal["spawn", "forkserver"] = "spawn"

    def validate(self) -> None:
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0 (0 = inline), got {self.num_workers}")
        try:
            check_smoothing(self.smoothing)
        except ValueError as err:
            raise ConfigError("smoothing", str(err)) from None
        if not 1 <= self.max_n <= 8:
            raise ConfigError("max_n", f"must be in 1..8, got {self.max_n}")
        for name in ("timeout_s", "start_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if self.chunk_size < 0:
            raise ConfigError(
                "chunk_size", f"must be >= 0 (0 = one chunk per worker), got {self.chunk_size}"
            )


class RewardPoolError(RuntimeError):
    """The reward workers failed: a worker died, timed out, or could not start."""


@dataclass(frozen=True)
class Rewards:
    rewards: np.ndarray  # float64 [B]: BLEU of each sampled caption
    baselines: np.ndarray  # float64 [B]: BLEU of each greedy caption

    @property
    def advantages(self) -> np.ndarray:
        return self.rewards - self.baselines


# ---------------------------------------------------------------- token ids -> BleuBatch


def _to_numpy(x):
    """A torch tensor (by duck typing: this module must not import torch, its workers
    would pay for it) or anything array-like, as numpy."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return x


def _flatten_rows(seqs, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A batch of token sequences ([N, T] array/tensor, or a list of sequences) ->
    (flat int64 tokens, int64 lengths)."""
    seqs = _to_numpy(seqs)
    if isinstance(seqs, np.ndarray):
        if seqs.ndim != 2:
            raise ValueError(
                f"{what}: expected a [batch, length] array of token ids, got shape {seqs.shape}"
            )
        if seqs.size and not np.issubdtype(seqs.dtype, np.integer):
            raise ValueError(f"{what}: expected integer token ids, got dtype {seqs.dtype}")
        return seqs.astype(np.int64).ravel(), np.full(seqs.shape[0], seqs.shape[1], np.int64)
    rows = [_to_numpy(s) for s in seqs]
    rows = [r.tolist() if isinstance(r, np.ndarray) else r for r in rows]
    try:
        tokens = np.fromiter(chain.from_iterable(rows), np.int64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: expected sequences of integer token ids ({err})") from None
    return tokens, np.array([len(r) for r in rows], np.int64)


@dataclass(frozen=True)
class _SpecialIds:
    pad_id: int
    start_id: int
    end_id: int

    def clean(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cut every row at its first <end> and drop <pad> and <start>, vectorized."""
        row = np.repeat(np.arange(len(lengths)), lengths)
        is_end = tokens == self.end_id
        ends_through = np.concatenate([[0], np.cumsum(is_end)])  # <end>s before each position
        row_start = np.cumsum(lengths) - lengths
        after_end = ends_through[:-1] > ends_through[row_start][row]
        keep = ~is_end & ~after_end & (tokens != self.pad_id) & (tokens != self.start_id)
        return tokens[keep], np.bincount(row[keep], minlength=len(lengths)).astype(np.int64)


def _flatten_references(references, num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """references[b] = the reference captions of sample b (list of sequences or [R, T]),
    or one [B, R, T] array -> (tokens, lengths, refs per sample)."""
    references = _to_numpy(references)
    if isinstance(references, np.ndarray):
        if references.ndim != 3:
            raise ValueError(
                f"references: expected [batch, refs, length] token ids, got {references.shape}"
            )
        if len(references) != num_samples:
            raise ValueError(
                f"references: got {len(references)} samples for {num_samples} sampled captions"
            )
        tokens, lengths = _flatten_rows(references.reshape(-1, references.shape[-1]), "references")
        return tokens, lengths, np.full(num_samples, references.shape[1], np.int64)
    if len(references) != num_samples:
        raise ValueError(
            f"references: got {len(references)} samples for {num_samples} sampled captions"
        )
    groups = [_to_numpy(group) for group in references]
    per_sample = np.array([len(group) for group in groups], np.int64)
    flat = [row for group in groups for row in group]
    tokens, lengths = _flatten_rows(flat, "references")
    return tokens, lengths, per_sample


def encode_batch(sampled, greedy, references, ids: _SpecialIds) -> BleuBatch:
    """Turn the trainer's token ids into a cleaned :class:`BleuBatch` with H = 2
    hypotheses per sample (sampled, greedy). References that are empty after cleaning are
    dropped: an empty caption is padding, not a reference (it would skew the brevity penalty)."""
    sampled_tokens, sampled_lengths = ids.clean(*_flatten_rows(sampled, "sampled"))
    greedy_tokens, greedy_lengths = ids.clean(*_flatten_rows(greedy, "greedy"))
    num_samples = len(sampled_lengths)
    if len(greedy_lengths) != num_samples:
        raise ValueError(
            f"greedy: got {len(greedy_lengths)} captions for {num_samples} sampled captions"
        )
    ref_tokens, ref_lengths, per_sample = _flatten_references(references, num_samples)
    ref_tokens, ref_lengths = ids.clean(ref_tokens, ref_lengths)
    sample_of_ref = np.repeat(np.arange(num_samples), per_sample)
    nonempty = ref_lengths > 0
    per_sample = np.bincount(sample_of_ref[nonempty], minlength=num_samples).astype(np.int64)
    if num_samples and per_sample.min() == 0:
        empty = int(np.argmin(per_sample))
        raise ValueError(f"references: sample {empty} has no non-empty reference caption")
    # Interleave per sample: (sampled, greedy) of sample 0, then of sample 1, ...
    hyp_lengths = np.stack([sampled_lengths, greedy_lengths], axis=1)
    which = np.repeat(np.tile([0, 1], num_samples), hyp_lengths.ravel())
    hyp_tokens = np.empty(len(sampled_tokens) + len(greedy_tokens), np.int64)
    hyp_tokens[which == 0] = sampled_tokens
    hyp_tokens[which == 1] = greedy_tokens
    batch = BleuBatch(hyp_tokens, hyp_lengths, ref_tokens, ref_lengths[nonempty], per_sample)
    lowest = min(hyp_tokens.min(initial=0), ref_tokens.min(initial=0))
    if lowest < 0:
        raise ValueError(f"token ids must be non-negative, found {lowest}")
    return batch


# ---------------------------------------------------------------- worker side


def _worker_ready() -> int:
    return os.getpid()


def _score_chunk(batch: BleuBatch, max_n: int, smoothing: str) -> np.ndarray:
    return score_batch(batch, max_n, smoothing)


# ---------------------------------------------------------------- the pool


class RewardFuture:
    """The pending rewards of one batch; ``result()`` waits at most ``timeout_s``."""

    def __init__(
        self, pool: RewardPool, chunks: list[Future], executor: ProcessPoolExecutor | None
    ):
        self._pool = pool
        self._chunks = chunks
        self._executor = executor  # the workers these chunks went to
        self._rewards: Rewards | None = None

    def done(self) -> bool:
        return all(chunk.done() for chunk in self._chunks)

    def result(self, timeout: float | None = None) -> Rewards:
        if self._rewards is not None:
            return self._rewards
        timeout = self._pool.cfg.timeout_s if timeout is None else timeout
        _, pending = wait(self._chunks, timeout=timeout)
        if pending:
            self._pool._stop_workers(self._executor)
            raise RewardPoolError(
                f"rewards not ready after {timeout:g} s (reward.timeout_s); the reward workers "
                "were stopped and restart on the next submit"
            )
        scores = []
        for chunk in self._chunks:
            try:
                scores.append(chunk.result())
            except BrokenProcessPool as err:
                self._pool._stop_workers(self._executor)
                raise RewardPoolError(
                    "a reward worker process died (killed or crashed) before returning its "
                    "rewards; the pool restarts on the next submit"
                ) from err
            except Exception as err:
                raise RewardPoolError(f"reward worker failed: {type(err).__name__}: {err}") from err
        scores = np.concatenate(scores) if scores else np.zeros((0, 2))
        self._rewards = Rewards(rewards=scores[:, 0].copy(), baselines=scores[:, 1].copy())
        return self._rewards


def _done_future(value) -> Future:
    future = Future()
    future.set_result(value)
    return future


class RewardPool:
    """``submit(sampled, greedy, references) -> RewardFuture``; ``num_workers = 0`` is inline.

    Token ids are LongTensors or arrays [B, T] (padded) or lists of sequences; ``references[b]``
    holds every reference caption of sample b's image (a list of sequences or an [R, T] array),
    or ``references`` is one [B, R, T] array. Each sequence is cut at its first ``end_id`` and
    ``pad_id``/``start_id`` are dropped, so decoder output and padded references go in as they are.
    """

    def __init__(
        self, cfg: RewardConfig | None = None, *, pad_id: int = 0, start_id: int = 1,
        end_id: int = 2,
    ):
        self.cfg = cfg if cfg is not None else RewardConfig()
        self.cfg.validate()
        self.ids = _SpecialIds(pad_id, start_id, end_id)
        self.num_restarts = 0  # times the workers were replaced after a death or a timeout
        self._executor: ProcessPoolExecutor | None = None
        self._closed = False
        if self.cfg.num_workers > 0:
            self._executor = self._start_executor()

    # -- public API

    def submit(self, sampled, greedy, references) -> RewardFuture:
        if self._closed:
            raise RewardPoolError("the reward pool is closed")
        batch = encode_batch(sampled, greedy, references, self.ids)
        if self.cfg.num_workers == 0:
            return RewardFuture(self, [_done_future(self._score(batch))], None)
        if self._executor is None:
            self._restart("its workers were stopped")
        try:
            chunks = self._submit_chunks(batch)
        except BrokenProcessPool:  # a worker died while idle since the last batch
            self._restart("a worker process died")
            chunks = self._submit_chunks(batch)
        return RewardFuture(self, chunks, self._executor)

    def compute_inline(self, sampled, greedy, references) -> Rewards:
        """The same rewards, computed synchronously in this process."""
        batch = encode_batch(sampled, greedy, references, self.ids)
        return RewardFuture(self, [_done_future(self._score(batch))], None).result()

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (empty when inline or stopped)."""
        if self._executor is None:
            return []
        return list(self._executor._processes or {})  # noqa: SLF001 - no public accessor

    def close(self) -> None:
        """Stop the workers and wait (at most ``timeout_s``) for them to exit; idempotent."""
        self._closed = True
        if self._executor is not None:
            _shutdown(self._executor, grace_s=self.cfg.timeout_s)
            self._executor = None

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals

    def _score(self, batch: BleuBatch) -> np.ndarray:
        return score_batch(batch, self.cfg.max_n, self.cfg.smoothing)

    def _submit_chunks(self, batch: BleuBatch) -> list[Future]:
        total = batch.num_samples
        size = max(1, self.cfg.chunk_size or -(-total // self.cfg.num_workers))
        chunks = [batch.slice(start, min(start + size, total)) for start in range(0, total, size)]
        return [
            self._executor.submit(_score_chunk, chunk, self.cfg.max_n, self.cfg.smoothing)
            for chunk in chunks
        ]

    def _start_executor(self) -> ProcessPoolExecutor:
        """Start all workers now (a ready check per worker), so the first batch and the
        pids are not left to lazy spawning."""
        context = multiprocessing.get_context(self.cfg.start_method)
        # serve: a worker whose rank was killed ends too, not blocks on its queue.
        executor = ProcessPoolExecutor(self.cfg.num_workers, mp_context=context, initializer=serve,
                                       initargs=(os.getpid(),))
        ready = [executor.submit(_worker_ready) for _ in range(self.cfg.num_workers)]
        _, pending = wait(ready, timeout=self.cfg.start_timeout_s)
        failed = pending or any(f.exception() is not None for f in ready)
        if failed:
            _shutdown(executor, grace_s=0)
            raise RewardPoolError(
                f"reward workers did not start (start_method={self.cfg.start_method}); with spawn "
                "or forkserver the training script must guard its entry point with "
                "`if __name__ == '__main__':`"
            )
        return executor

    def _stop_workers(self, executor: ProcessPoolExecutor | None) -> None:
        """Kill ``executor``'s (broken or stuck) workers if they are still this pool's current
        ones (a submit may have replaced them already); the next submit starts new ones."""
        if executor is not None and executor is self._executor:
            _shutdown(executor, grace_s=0)
            self._executor = None

    def _restart(self, reason: str) -> None:
        if self._executor is not None:
            _shutdown(self._executor, grace_s=0)
        self.num_restarts += 1
        log.warning("reward pool: %s; starting %d new workers (restart %d)",
                    reason, self.cfg.num_workers, self.num_restarts)
        self._executor = self._start_executor()


def _shutdown(executor: ProcessPoolExecutor, grace_s: float) -> None:
    """Release ``executor`` and make sure its worker processes (ours) are gone: they get
    ``grace_s`` seconds to finish their task and exit, then they are killed. Never blocks
    longer than that, even on a stuck worker (``shutdown(wait=True)`` could)."""
    processes = list((executor._processes or {}).values())  # noqa: SLF001 - no public accessor
    if grace_s <= 0:
        for process in processes:
            process.kill()
    executor.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(timeout=5)
