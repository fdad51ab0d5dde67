"""Embeddings of an evaluation split, computed on every rank and gathered.

Every rank encodes its own part of the split (the eval loader gives every rank the same
number of equal, padded batches), and the parts are gathered at the end: no rank waits in
a collective while another does all the work.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from cmr.data.decode import BadSample, parse_text
from cmr.data.remote import LOCAL, redact
from cmr.data.source import ShardSet
from cmr.data.tario import read_members
from cmr.data.transforms import normalize

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EmbeddingSet:
    """A split's images and captions in the joint space (float32, CPU).

    ``caption_owner[c]`` is the row in ``image_emb`` of caption c's image; ``caption_texts[c]``
    its text as the shard stores it, read as the loader reads it (blank captions dropped, ends
    stripped), for display: its token ids would show every word the vocabulary lacks as
    <unk>. ``ids``/``keys``/``labels`` are per image.
    """

    image_emb: torch.Tensor  # [N, D]
    caption_emb: torch.Tensor  # [C, D]
    caption_owner: torch.Tensor  # [C] int64
    caption_texts: list[str]
    ids: list[Any]
    keys: list[str]
    labels: list[Any]

    @property
    def num_images(self) -> int:
        return int(self.image_emb.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EmbeddingSet":
        return cls(**data)


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


@torch.no_grad()
def encode_batch(model, batch, mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings of the real rows, embeddings of all their captions)."""
    dtype = _model_dtype(model)
    if batch.images is not None:
        inputs = normalize(batch.images.to(device), mean, std, dtype=dtype)
    else:
        inputs = batch.features.to(device, dtype=dtype)
    mask = batch.mask.to(device)
    image_emb = model.encode_image(inputs)[mask].float()
    caption_emb = model.encode_text(batch.all_captions.to(device), batch.all_lengths.to(device)).float()
    return image_emb.cpu(), caption_emb.cpu()


@torch.no_grad()
def compute_embeddings(model, loader, *, mean, std, device, accelerator=None) -> EmbeddingSet:
    """Encode every sample of ``loader`` (an eval-mode StreamingLoader) with ``model`` (the
    plain module, not a DDP/DeepSpeed wrapper), gathering over ranks when ``accelerator``
    is given. Padding rows are dropped; caption owners are renumbered to the kept rows."""
    was_training = model.training
    model.eval()
    images, caption_parts, owners, ids, keys, labels = [], [], [], [], [], []
    for batch in loader:
        image_emb, caption_emb = encode_batch(model, batch, mean, std, device)
        # Row i of the batch -> index of that image among the kept ones so far.
        row_to_kept = torch.cumsum(batch.mask.long(), 0) - 1 + sum(x.shape[0] for x in images)
        images.append(image_emb)
        caption_parts.append(caption_emb)
        owners.append(row_to_kept[batch.caption_owner])
        real = batch.mask.tolist()
        ids += [x for x, m in zip(batch.ids, real) if m]
        keys += [x for x, m in zip(batch.keys, real) if m]
        labels += [x for x, m in zip(batch.labels, real) if m]
    model.train(was_training)
    dim = images[0].shape[1] if images else 0
    caption_owner = torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long)
    shardset = loader.dataset.shardset
    local = EmbeddingSet(
        image_emb=torch.cat(images) if images else torch.zeros(0, dim),
        caption_emb=torch.cat(caption_parts) if caption_parts else torch.zeros(0, dim),
        caption_owner=caption_owner,
        caption_texts=texts_per_caption_row(shardset, keys, caption_owner.tolist()),
        ids=ids, keys=keys, labels=labels,
    )
    if accelerator is None or accelerator.num_processes == 1:
        return local
    return _gather(local, accelerator)


def _gather(local: EmbeddingSet, accelerator) -> EmbeddingSet:
    """All ranks' sets, concatenated in rank order (owners shifted by the images before)."""
    from accelerate.utils import gather_object

    parts = gather_object([local])  # small per-rank objects; tensors travel pickled on CPU
    offset, owners = 0, []
    for part in parts:
        owners.append(part.caption_owner + offset)
        offset += part.num_images
    return EmbeddingSet(
        image_emb=torch.cat([p.image_emb for p in parts]),
        caption_emb=torch.cat([p.caption_emb for p in parts]),
        caption_owner=torch.cat(owners),
        caption_texts=[c for p in parts for c in p.caption_texts],
        ids=[x for p in parts for x in p.ids],
        keys=[x for p in parts for x in p.keys],
        labels=[x for p in parts for x in p.labels],
    )


def read_caption_texts(shards: ShardSet | str | Path, keys: list[str]) -> dict[str, list[str]]:
    """The captions of the samples ``keys`` ("<shard file>/<key>"), parsed as the loader parses
    them (so they line up with its caption rows), reading only the shards' text members.
    ``shards``: the split's ``ShardSet`` (local or remote), or a local split directory."""
    if isinstance(shards, ShardSet):
        where, opener = dict(zip(shards.names, shards.paths)), shards.opener
    else:
        where, opener = {}, LOCAL
    wanted: dict[str, set[str]] = {}
    for key in keys:
        shard, _, sample = key.partition("/")
        wanted.setdefault(shard, set()).add(sample)
    found: dict[str, list[str]] = {}
    for shard, samples in wanted.items():
        groups: dict[str, dict] = {}
        location = where.get(shard) or Path(shards) / shard
        for sample, ext, data in read_members(location, ("json", "txt"), opener):
            if sample in samples:
                groups.setdefault(sample, {})[ext] = data
        for sample, group in groups.items():
            try:
                found[f"{shard}/{sample}"] = parse_text(group)[0]
            except BadSample:
                continue  # the loader skipped it too, so no caption row asks for it
    return found


def texts_per_caption_row(shards: ShardSet | str | Path, keys: list[str],
                          caption_owner: list[int]) -> list[str]:
    """Per caption row, its stored text: the n-th row of an image is its n-th caption."""
    # Read back by key rather than carried through the loader: one pass over the text members
    # of the shards involved, instead of strings in every training batch.
    stored = read_caption_texts(shards, keys)
    seen: Counter = Counter()
    texts = []
    for owner in caption_owner:
        captions = stored.get(keys[owner], [])
        texts.append(captions[seen[owner]] if seen[owner] < len(captions) else "")
        seen[owner] += 1
    if not all(texts):  # only if a shard changed while it was being read
        where = redact(shards.split_dir) if isinstance(shards, ShardSet) else shards
        logger.warning("%s: %d caption texts could not be read back; shown empty", where, sum(not t for t in texts))
    return texts
