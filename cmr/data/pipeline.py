"""The streaming dataset: a rank's DataLoader workers each read their slot of the epoch plan.

Per worker, per epoch::

    plan slot -> pieces of shards -> raw samples (bytes) -> shuffle buffer
              -> windows of batch_size raw samples -> decode + augment -> Batch

Everything random (shard order, shuffle buffer, crop, flip, which caption) is drawn from
generators seeded by ``(seed, epoch, ...)``; per-sample draws are seeded by the sample's
key, so a sample is transformed the same way whichever worker or rank reads it. Skipping
the first windows of a resumed epoch touches only raw bytes (no decoding), and reproduces
exactly the batches an uninterrupted run would have produced next.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import ClassVar, Literal

import torch
from torch.utils.data import IterableDataset, get_worker_info

from cmr.config import ConfigError
from cmr.data.assign import EpochPlan, plan_epoch, resampled_shards, worker_batch_counts
from cmr.data.batch import Batch, Sample, collate
from cmr.data.decode import BadSample, decode_feature, decode_image, parse_text
from cmr.data.remote import Opener, redact
from cmr.data.source import ShardSet, open_split
from cmr.data.tario import IMAGE_EXTENSIONS, Missing, read_piece
from cmr.data.transforms import ImageTransformConfig, decode_min_side, eval_transform, train_transform
from cmr.data.vocab import VocabConfig, Vocabulary


@dataclasses.dataclass
class DataConfig:
    REMOVED_FIELDS: ClassVar[dict[str, str]] = {
        "val_split": "removed: nothing read it; the split evaluated during training is eval.split",
        # Not a field: the exactly-once plan cuts the sample stream by shard, so it needs
        # every shard's count; a total alone cannot say which shard holds which sample.
        "num_samples": "not a field: a total cannot place samples in shards; give data.shard_sizes "
                       "(one count for every shard, or a list), or data.resampled: true with "
                       "data.samples_per_epoch (open_clip's --train-num-samples)",
    }

    # Where the shards are: a dataset directory written by `python -m shards build ...` or a
    # URL prefix holding the same layout (https://host/coco, s3://bucket/coco); a brace
    # pattern or list of shard locations (https://host/cc3m/{00000..00331}.tar) for one
    # split; or a mapping {split: directory | pattern | list}.
    shards: str | list[str] | dict[str, str | list[str]]
    train_split: str = "train"
    batch_size: int = 64  # per rank (and per micro-batch under gradient accumulation)
    num_workers: int = 2  # DataLoader worker processes per rank; 0 = read in the main process
    prefetch_factor: int = 2
    # How workers start. Never "fork": a rank runs threads (gloo, wandb, queue feeders), and a
    # child forked while one of them holds the interpreter's lock hangs inside os.fork().
    # forkserver: forked from a clean process that has imported the pipeline once (a worker
    # starts in milliseconds); spawn: a fresh interpreter per worker (seconds each).
    worker_start_method: Literal["spawn", "forkserver"] = "forkserver"
    worker_timeout_s: float = 600.0  # longest wait for a worker's next batch; 0 = no limit
    # Training: start the next epoch's workers (a second set) while this epoch runs, so an
    # epoch does not begin with an empty shuffle buffer and no decoded batch.
    prefetch_next_epoch: bool = True
    shuffle_buffer: int = 500  # raw samples held per worker for shuffling; 0 = off
    shuffle_shards: bool = True
    seed: int = 0
    feature_dim: int | None = None  # precomputed features: checked on every sample
    max_pixels: int = 89_478_485  # larger images are skipped (decompression bombs)
    max_bad_fraction: float = 0.01  # stop when more skipped samples than this fraction
    min_samples_for_bad_check: int = 200
    resampled: bool = False  # draw shards with replacement (very large data)
    samples_per_epoch: int | None = None  # required with resampled
    # Manifest-less shards: samples per shard (a list, or one count for every shard); else
    # img2dataset's *_stats.json, else one counting pass (cached under ~/.cache/cmr).
    shard_sizes: list[int] | int | None = None
    allow_pipe: bool = False  # `pipe:` locations run a shell command: off unless asked for
    max_retries: int = 3  # reopen a remote shard this often after a reset, stall or 5xx
    retry_backoff_s: float = 1.0  # first wait before a retry; doubles with each
    io_timeout_s: float = 60.0  # connect timeout, and the longest a transfer may stall
    # Each worker starts the transfer of its next http(s) shard while it reads the current one,
    # so a shard's connection and first bytes are not waited for (one extra connection per worker).
    open_ahead: bool = True
    image: ImageTransformConfig = dataclasses.field(default_factory=ImageTransformConfig)
    vocab: VocabConfig = dataclasses.field(default_factory=VocabConfig)

    def validate(self) -> None:
        for name in ("batch_size", "prefetch_factor"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "shuffle_buffer", "min_samples_for_bad_check"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError("max_bad_fraction", f"must be in [0, 1], got {self.max_bad_fraction}")
        if self.max_pixels < 1:
            raise ConfigError("max_pixels", f"must be >= 1, got {self.max_pixels}")
        if self.resampled and not self.samples_per_epoch:
            raise ConfigError("samples_per_epoch", "is required when resampled is true")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ConfigError("samples_per_epoch", f"must be >= 1, got {self.samples_per_epoch}")
        if self.max_retries < 0:
            raise ConfigError("max_retries", f"must be >= 0, got {self.max_retries}")
        if self.worker_start_method not in ("spawn", "forkserver"):
            raise ConfigError("worker_start_method", f"must be spawn or forkserver, got {self.worker_start_method!r}")
        if self.worker_timeout_s < 0:
            raise ConfigError("worker_timeout_s", f"must be >= 0 (0 = no limit), got {self.worker_timeout_s}")
        for name in ("retry_backoff_s", "io_timeout_s"):
            if getattr(self, name) < 0 or (name == "io_timeout_s" and self.io_timeout_s == 0):
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        sizes = [self.shard_sizes] if isinstance(self.shard_sizes, int) else self.shard_sizes or []
        if any(n < 0 for n in sizes):
            raise ConfigError("shard_sizes", f"counts must be >= 0, got {self.shard_sizes}")
        self._check_shards()

    def _check_shards(self) -> None:
        specs = list(self.shards.values()) if isinstance(self.shards, dict) else [self.shards]
        if isinstance(self.shards, dict) and not self.shards:
            raise ConfigError("shards", "names no split")
        for spec in specs:
            for location in (spec if isinstance(spec, list) else [spec]):
                if not location:
                    raise ConfigError("shards", "is empty")
                if str(location).startswith("pipe:") and not self.allow_pipe:
                    raise ConfigError("allow_pipe", f"{redact(location)} runs a shell command; "
                                      "set data.allow_pipe: true to allow it")

    def opener(self) -> Opener:
        """How this config's shards are opened (picklable: DataLoader workers carry it)."""
        return Opener(allow_pipe=self.allow_pipe, max_retries=self.max_retries,
                      retry_backoff_s=self.retry_backoff_s, timeout_s=self.io_timeout_s, ahead=self.open_ahead)

    def open_split(self, split: str) -> ShardSet:
        """The shards of ``split`` (sizes from ``shard_sizes`` only for manifest-less shards)."""
        return open_split(self.shards, split, self.opener(), self.shard_sizes)


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from any printable parts, equal in every process (unlike ``hash``)."""
    text = ":".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def shuffle_buffer(items: Iterable, size: int, rng: random.Random, initial: int = 100) -> Iterator:
    """Shuffle through a buffer of at most ``size`` items.

    Output starts once ``initial`` items are in (so the first batch of an epoch doesn't wait
    for a full buffer); the buffer then grows by one item per item yielded up to ``size``.
    """
    if size <= 1:
        yield from items
        return
    initial = max(1, min(initial, size))
    buffer: list = []
    grow = False
    for item in items:
        buffer.append(item)
        if len(buffer) < initial:
            continue
        grow = not grow and len(buffer) < size
        if grow:
            continue  # every other item only fills the buffer, until it is full
        i = rng.randrange(len(buffer))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """Batches of one rank, for one epoch at a time (``set_epoch``).

    Give it to a ``torch.utils.data.DataLoader`` with ``batch_size=None``; it batches
    itself because a batch is a fixed window of the slot's stream. Do not pass the
    DataLoader to ``accelerator.prepare``: splitting by rank already happened here.
    """

    def __init__(
        self,
        shardset: ShardSet,
        cfg: DataConfig,
        vocab: Vocabulary,
        *,
        rank: int = 0,
        world_size: int = 1,
        mode: Literal["train", "eval"] = "train",
        batch_multiple: int = 1,
    ):
        self.shardset, self.cfg, self.vocab = shardset, cfg, vocab
        self.rank, self.world_size, self.mode = rank, world_size, mode
        self.batch_multiple = batch_multiple
        # What the next pass reads, in shared memory so that persistent DataLoader workers see
        # the main process change it: [epoch, worker offset, windows to skip per worker...].
        self._control = torch.zeros(2 + self.num_loader_workers, dtype=torch.long).share_memory_()
        self.feature_dim = None
        if shardset.modality == "features":
            self.feature_dim = cfg.feature_dim or shardset.feature_dim
            if self.feature_dim is None:
                raise ConfigError("data.feature_dim", "unknown: set it (the shards have no manifest)")

    def copy(self) -> ShardStream:
        """The same stream with its own control (for a second set of workers)."""
        other = copy.copy(self)
        other._control = self._control.clone().share_memory_()
        return other

    @property
    def num_loader_workers(self) -> int:
        return max(1, self.cfg.num_workers)

    @property
    def epoch(self) -> int:
        return int(self._control[0])

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self._control[0] = epoch

    @property
    def worker_offset(self) -> int:
        """DataLoader serves workers round robin from worker 0; a run resumed after k batches
        must start at worker k % n, so physical worker p plays slot p + offset."""
        return int(self._control[1])

    @worker_offset.setter
    def worker_offset(self, offset: int) -> None:
        self._control[1] = offset

    @property
    def skip_windows(self) -> dict[int, int]:
        """Per worker, the windows (batches) already consumed this epoch (resume)."""
        return {w: int(n) for w, n in enumerate(self._control[2:].tolist())}

    @skip_windows.setter
    def skip_windows(self, windows: dict[int, int]) -> None:
        for worker in range(self.num_loader_workers):
            self._control[2 + worker] = windows.get(worker, 0)

    def plan(self, epoch: int | None = None) -> EpochPlan | None:
        """The exact plan of an epoch (None in resampled mode, which has no exact plan)."""
        if self.cfg.resampled and self.mode == "train":
            return None
        return plan_epoch(
            list(self.shardset.sizes),
            world_size=self.world_size,
            num_workers=self.num_loader_workers,
            batch_size=self.cfg.batch_size,
            seed=self.cfg.seed,
            epoch=self.epoch if epoch is None else epoch,
            mode=self.mode,
            shuffle=self.cfg.shuffle_shards and self.mode == "train",
            batch_multiple=self.batch_multiple,
        )

    def num_batches(self) -> int:
        """Batches this rank yields per epoch; the same number on every rank."""
        if self.cfg.resampled and self.mode == "train":
            per_rank = self.cfg.samples_per_epoch // (self.world_size * self.cfg.batch_size)
            return per_rank // self.batch_multiple * self.batch_multiple
        return self.plan().num_batches_per_rank

    # -- reading ---------------------------------------------------------------------------

    def _raw_stream(self, worker: int) -> tuple[Iterator, int]:
        """This worker's raw samples for the epoch (shuffled) and how many batches they make."""
        paths, sizes, names = self.shardset.paths, self.shardset.sizes, self.shardset.names
        opener = self.shardset.opener
        if self.cfg.resampled and self.mode == "train":
            num_batches = self._resampled_worker_batches(worker)
            shards = resampled_shards(len(paths), self.cfg.seed, self.epoch, self.rank, worker)
            raw = itertools.chain.from_iterable(
                _named(read_piece(paths[i], 0, sizes[i], opener), names[i]) for i in shards
            )
            raw = itertools.islice(raw, num_batches * self.cfg.batch_size)
        else:
            slot = self.plan().slot(self.rank, worker)
            num_batches = slot.num_batches
            locations = [paths[p.shard] for p in slot.pieces]
            raw = itertools.chain.from_iterable(
                _named(_reading_ahead(read_piece(locations[k], p.start, p.stop, opener), locations[k + 1:k + 2],
                                      opener), names[p.shard])
                for k, p in enumerate(slot.pieces)
            )
        if self.mode == "train" and self.cfg.shuffle_buffer:
            rng = random.Random(stable_seed("buffer", self.cfg.seed, self.epoch, self.rank, worker))
            raw = shuffle_buffer(raw, self.cfg.shuffle_buffer, rng)
        return raw, num_batches

    def _resampled_worker_batches(self, worker: int) -> int:
        return worker_batch_counts(self.num_batches(), self.num_loader_workers)[worker]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        if info is not None and info.num_workers != self.num_loader_workers:
            raise RuntimeError(f"dataset expects {self.num_loader_workers} workers, got {info.num_workers}")
        worker = ((info.id if info is not None else 0) + self.worker_offset) % self.num_loader_workers
        raw, num_batches = self._raw_stream(worker)
        batch_size = self.cfg.batch_size
        skip = self.skip_windows.get(worker, 0)
        for window in range(num_batches):
            items = list(itertools.islice(raw, batch_size))
            if window < skip:
                continue  # already consumed before the restart: raw bytes only, no decoding
            skipped: Counter = Counter()
            samples = [self._decode(item, skipped) for item in items]
            yield collate(
                samples,
                eval_mode=self.mode == "eval",
                pad_to=batch_size,
                image_shape=self._image_shape(),
                feature_dim=self.feature_dim,
                skipped=skipped,
                epoch=self.epoch,
                worker=worker,
                window=window,
            )

    def _image_shape(self) -> tuple[int, int, int] | None:
        if self.shardset.modality == "features":
            return None
        return (3, self.cfg.image.size, self.cfg.image.size)

    # -- decoding --------------------------------------------------------------------------

    def _decode(self, item: dict | Missing, skipped: Counter) -> Sample | None:
        """The decoded sample, or None (and a count under its reason) if it is unusable."""
        if isinstance(item, Missing):
            skipped[item.reason] += 1
            return None
        try:
            return self._decode_sample(item)
        except BadSample as bad:
            skipped[bad.reason] += 1
            return None

    def _decode_sample(self, raw: dict) -> Sample:
        key = f"{raw['__shard__']}/{raw['__key__']}"
        rng = random.Random(stable_seed("sample", self.cfg.seed, self.epoch, key))
        captions, labels, source_id = parse_text(raw)
        pixels = features = None
        if self.shardset.modality == "features":
            if "feat.npy" not in raw:
                raise BadSample("missing_feature")
            features = decode_feature(raw["feat.npy"], self.feature_dim)
        else:
            ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
            if ext is None:
                raise BadSample("missing_image")
            # Large photos decode at a reduced JPEG scale that still covers any crop.
            min_side = decode_min_side(self.cfg.image, train=self.mode == "train")
            image = decode_image(raw[ext], max_pixels=self.cfg.max_pixels, target_min_side=min_side)
            if self.mode == "train":
                pixels = train_transform(image, self.cfg.image, rng)
            else:
                pixels = eval_transform(image, self.cfg.image)
        max_tokens = self.cfg.vocab.max_caption_tokens
        all_tokens = [self.vocab.encode(c, max_tokens) for c in captions]
        # Training sees one caption per image per epoch, drawn by the sample's own generator.
        tokens = rng.choice(all_tokens) if self.mode == "train" else all_tokens[0]
        return Sample(key=key, source_id=source_id, pixels=pixels, features=features, tokens=tokens,
                      all_tokens=all_tokens, labels=labels)


def _reading_ahead(samples: Iterator, following: list, opener: Opener) -> Iterator:
    """``samples`` of one piece; once its first sample is in, the next piece's shard is opened ahead."""
    for index, sample in enumerate(samples):
        if index == 0 and following:
            opener.open_ahead(following[0])
        yield sample


def _named(samples: Iterator, shard_name: str) -> Iterator:
    for sample in samples:
        if isinstance(sample, dict):
            sample["__shard__"] = shard_name
        yield sample
