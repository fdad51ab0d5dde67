"""The batch the loader hands the trainer, and how samples become one."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import torch

from cmr.data.vocab import pad_captions


@dataclasses.dataclass
class Sample:
    """One decoded sample, inside a worker."""

    key: str  # "<shard file>/<key in shard>": unique within a split
    source_id: Any  # the dataset's own id of the sample, if it has one
    pixels: torch.Tensor | None  # uint8 [3, H, W]
    features: torch.Tensor | None  # float32 [D]
    tokens: list[int]  # train: the caption drawn this epoch; eval: the first caption
    all_tokens: list[list[int]]  # every caption of the sample (references for BLEU, eval)
    labels: Any


@dataclasses.dataclass
class Batch:
    """A batch of image-caption pairs.

    Images travel as uint8 (4x less to copy between processes than float) and are
    normalised on the accelerator with ``cmr.data.transforms.normalize``.

    ``mask`` marks real rows. Training batches have no padding rows (they are short only
    if corrupt samples were skipped in their window); evaluation batches are padded to a
    fixed size so every rank runs the same number of equal batches.
    ``captions`` holds one caption per row (training: the one drawn for this epoch;
    evaluation: the first) and ``all_captions`` every caption of every real row, with
    ``caption_owner[i]`` the row caption ``i`` belongs to (references for BLEU, evaluation).
    """

    images: torch.Tensor | None  # uint8 [B, 3, H, W] (pixel datasets)
    features: torch.Tensor | None  # float32 [B, D] (precomputed-feature datasets)
    captions: torch.Tensor  # int64 [B, L], <start> w... <end>, padded with 0
    lengths: torch.Tensor  # int64 [B]
    mask: torch.Tensor  # bool [B]
    keys: list[str]
    ids: list[Any]  # the dataset's own ids (e.g. the emoji code point, the COCO id)
    labels: list[Any]
    all_captions: torch.Tensor | None = None  # int64 [C, L]
    all_lengths: torch.Tensor | None = None  # int64 [C]
    caption_owner: torch.Tensor | None = None  # int64 [C]
    # Where the batch came from, for exact resumption, and what was skipped on the way.
    epoch: int = 0
    worker: int = 0
    window: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.mask.sum())

    def references(self) -> list[list[list[int]]]:
        """Per row, the token ids of each of its captions (none for padding rows)."""
        refs: list[list[list[int]]] = [[] for _ in range(self.size)]
        for caption, length, owner in zip(self.all_captions.tolist(), self.all_lengths.tolist(),
                                          self.caption_owner.tolist()):
            refs[owner].append(caption[:length])
        return refs

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    def pin_memory(self) -> "Batch":
        pinned = {
            f.name: getattr(self, f.name).pin_memory()
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **pinned)


def collate(
    samples: list[Sample | None],
    *,
    eval_mode: bool,
    pad_to: int,
    image_shape: tuple[int, ...] | None,
    feature_dim: int | None,
    skipped: Counter,
    epoch: int,
    worker: int,
    window: int,
) -> Batch:
    """Stack the samples of one window; ``None`` entries are skipped samples (eval: masked rows)."""
    rows = [s for s in samples if s is not None] if not eval_mode else list(samples)
    rows += [None] * (pad_to - len(rows)) if eval_mode else []
    mask = torch.tensor([s is not None for s in rows], dtype=torch.bool)
    images = features = None
    if image_shape is not None:
        images = torch.zeros((len(rows), *image_shape), dtype=torch.uint8)
        for i, s in enumerate(rows):
            if s is not None:
                images[i] = s.pixels
    else:
        features = torch.zeros((len(rows), feature_dim or 0), dtype=torch.float32)
        for i, s in enumerate(rows):
            if s is not None:
                features[i] = s.features
    captions, lengths = pad_captions([s.tokens if s is not None else [] for s in rows])
    batch = Batch(
        images=images,
        features=features,
        captions=captions,
        lengths=lengths,
        mask=mask,
        keys=[s.key if s is not None else "" for s in rows],
        ids=[s.source_id if s is not None else None for s in rows],
        labels=[s.labels if s is not None else None for s in rows],
        epoch=epoch,
        worker=worker,
        window=window,
        skipped=dict(skipped),
    )
    owner = [i for i, s in enumerate(rows) if s is not None for _ in s.all_tokens]
    every = [t for s in rows if s is not None for t in s.all_tokens]
    batch.all_captions, batch.all_lengths = pad_captions(every)
    batch.caption_owner = torch.tensor(owner, dtype=torch.long)
    return batch
