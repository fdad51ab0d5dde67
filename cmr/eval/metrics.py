"""Image-text retrieval metrics: Recall@K, median/mean rank, rsum, mAP@R and mAP@50.

The standard protocol (VSE++, Faghri et al. 2018; LIM, Gu et al. 2018): each image has one or
more captions, each caption belongs to exactly one image. With ``S = image_emb @ caption_emb.T``
(float32; pass L2-normalised embeddings for cosine similarity):

Ranking order. A query ranks the gallery by score, highest first. Equal scores are broken
*pessimistically*: among items with the same score, the non-relevant ones come first. So a
collapsed model (every score equal) gets the worst ranks, never the best, and the result does
not depend on the order of the inputs.

Ranks (1-based; "relevant" is always *caption* relevance here, labels or not):
  * image->text, image i:  rank_i = 1 + #{captions c of other images : S[i, c] >= best_i},
    best_i = max over i's own captions of S[i, c]  (the image is right at its best caption).
  * text->image, caption c:  rank_c = 1 + #{images j != owner(c) : S[j, c] >= S[owner(c), c]}.
  * R@K = 100 * fraction of queries with rank <= K.  medr = floor(median rank) (the median
    averages the two middle ranks when the count is even; this equals VSE++'s
    ``floor(median(0-based ranks)) + 1``).  meanr = mean rank.  rsum = sum of R@K over both
    directions and all ``ks`` (the usual six numbers).

Mean average precision (in percent, like R@K). For a query with R relevant items in the gallery
and rel(p), prec(p) = relevance and precision at position p of the order above:
  * mAP@R (Musgrave, Belongie & Lim, "A Metric Learning Reality Check", ECCV 2020):
    AP@R = (1/R) * sum_{p=1..R} rel(p) * prec(p), averaged over queries.
  * mAP@50: AP@50 = (1/min(R, 50)) * sum_{p=1..50} rel(p) * prec(p)  (``map_cutoff``).
  Relevance: with ``image_labels`` (e.g. emoji categories), an item is relevant when its image
  has the query's label (image query -> captions of same-label images, caption query -> images
  with its image's label). Without labels, caption relevance: i2t relevant = the image's own
  captions (R = its number of captions); t2i relevant = the caption's image (R = 1, so AP@R =
  [rank == 1] and AP@50 = 1/rank if rank <= 50 else 0).

How it is computed: images in row blocks of <= ``chunk_size``, captions in column blocks of <=
``caption_chunk_size``, so memory is bounded for any gallery size. Captions are grouped by
image, so each image block's own captions form one block; those "own" blocks are computed first
(they give every threshold: best_i and S[owner(c), c]) and the remaining blocks after them.
Every similarity is computed exactly once; each block updates per-row counts (i2t), per-column
counts (t2i) and per-query top lists (mAP). ``brute_force_metrics`` is the slow reference (full
matrix, one sort per query).

Exactness caveat: block products must give the same bits as one full product for the results to
equal the reference to the last rank. BLAS does so for the block shapes used here on the
machines tested, but not for every shape (e.g. one-row products); a difference can only move a
rank past a score tied to within one float32 ulp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np
import torch
from torch import Tensor

from cmr.config import ConfigError


@dataclass
class MetricsConfig:
    chunk_size: int = 1024  # image rows per block
    caption_chunk_size: int = 32768  # caption columns per block: bounds memory for huge galleries
    ks: tuple[int, ...] = (1, 5, 10)
    map_cutoff: int = 50

    def validate(self) -> None:
        for name in ("chunk_size", "caption_chunk_size", "map_cutoff"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError("ks", f"must be positive ranks, got {self.ks}")


# ----------------------------------------------------------------------------- input checks

def _check_inputs(image_emb, caption_emb, caption_owner, image_labels):
    """Float32 embeddings, int64 owners and per-image label ids; one-line ValueErrors."""
    for name, emb in (("image_emb", image_emb), ("caption_emb", caption_emb)):
        if not isinstance(emb, Tensor) or emb.dim() != 2 or not emb.is_floating_point():
            raise ValueError(f"{name} must be a 2-D float tensor, got {_describe(emb)}")
        if emb.shape[0] == 0:
            raise ValueError(f"{name} is empty")
    num_images, num_captions = image_emb.shape[0], caption_emb.shape[0]
    if image_emb.shape[1] != caption_emb.shape[1]:
        raise ValueError(f"image_emb has dimension {image_emb.shape[1]} but caption_emb has "
                         f"{caption_emb.shape[1]}")
    owner = torch.as_tensor(caption_owner)
    if owner.dim() != 1 or owner.is_floating_point() or owner.dtype == torch.bool:
        raise ValueError(f"caption_owner must be a 1-D integer tensor, got {_describe(owner)}")
    if owner.shape[0] != num_captions:
        raise ValueError(f"caption_owner has {owner.shape[0]} entries for {num_captions} captions")
    owner = owner.to(device=image_emb.device, dtype=torch.int64)
    if int(owner.min()) < 0 or int(owner.max()) >= num_images:
        raise ValueError(f"caption_owner values must index the {num_images} images, got range "
                         f"[{int(owner.min())}, {int(owner.max())}]")
    num_captions_per_image = torch.bincount(owner, minlength=num_images)
    empty = torch.nonzero(num_captions_per_image == 0).flatten()
    if len(empty):
        raise ValueError(f"image {int(empty[0])} has no captions ({len(empty)} of {num_images} "
                         "images have none); drop them (e.g. padding rows) before evaluating")
    images, captions = image_emb.float(), caption_emb.float()
    for name, emb in (("image_emb", images), ("caption_emb", captions)):
        # One pass: a NaN or inf anywhere makes its row's norm NaN or inf. Below the bound no dot
        # product (or partial sum of one) can overflow float32 (Cauchy-Schwarz).
        max_norm = float(torch.linalg.vector_norm(emb, dim=1).max())
        if not math.isfinite(max_norm) or max_norm > 1e18:
            raise ValueError(f"{name} contains NaN or inf, or values too large for float32 "
                             "similarities (normalise the embeddings)")
    return images, captions, owner, _label_ids(image_labels, num_images, image_emb.device)


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _label_ids(image_labels: Sequence[Hashable] | None, num_images: int, device) -> Tensor | None:
    if image_labels is None:
        return None
    is_array = isinstance(image_labels, (Tensor, np.ndarray))
    labels = image_labels.tolist() if is_array else list(image_labels)
    if len(labels) != num_images:
        raise ValueError(f"image_labels has {len(labels)} entries for {num_images} images")
    ids: dict[Hashable, int] = {}
    try:
        return torch.tensor([ids.setdefault(label, len(ids)) for label in labels], device=device)
    except TypeError:
        raise ValueError("image_labels must be hashable (one label per image)") from None


def _balanced_chunks(total: int, max_size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of near-equal size: no tiny tail block (tiny products use other BLAS
    kernels, whose last bits can differ from the full product's)."""
    num_chunks = max(1, math.ceil(total / max_size))
    bounds = [round(i * total / num_chunks) for i in range(num_chunks + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(num_chunks) if bounds[i + 1] > bounds[i]]


# ----------------------------------------------------------------------------- block kernels

def _count_at_least(block: Tensor, threshold: Tensor, dim: int) -> Tensor:
    """Per row (dim=1) or per column (dim=0), how many entries of ``block`` are >= ``threshold``.

    ``(block >= t).sum(dim)`` widens every bool to int64 and costs ~5x the comparison. Instead the
    bool mask is read as int64 words of 8 one-byte lanes and words are added directly: each lane
    counts its own column, and adding <= 255 words cannot carry from one lane into the next.
    """
    num_rows, width = block.shape
    padded = -(-width // 8) * 8
    mask = torch.empty(num_rows, padded, dtype=torch.bool, device=block.device)
    mask[:, width:] = False
    torch.ge(block, threshold, out=mask[:, :width])
    words = mask.view(torch.int64)  # [rows, padded / 8]
    if dim == 1:
        counts = torch.zeros(num_rows, dtype=torch.int64, device=block.device)
        for start in range(0, words.shape[1], 255):
            counts += words[:, start:start + 255].sum(1).view(torch.uint8).view(num_rows, 8).sum(1)
        return counts
    counts = torch.zeros(padded, dtype=torch.int64, device=block.device)
    for start in range(0, num_rows, 255):
        counts += words[start:start + 255].sum(0).view(torch.uint8)
    return counts[:width]


def _top_values(scores: Tensor, k: int, group: int = 16) -> tuple[Tensor, Tensor]:
    """The k highest values of each row of ``scores`` and their columns (k <= width).

    A full ``topk`` over a long row costs ~4x a pass that takes the max of each group of 16
    columns. The k groups with the highest maxima hold k values >= anything outside them, so the
    top k of those groups (plus the ragged tail) are exactly the row's top-k values. Group j is
    the strided set of columns j, j + G, j + 2G, ...: its max is an elementwise max of 16
    contiguous slices, which vectorises.
    """
    num_rows, width = scores.shape
    num_groups = width // group
    if num_groups < 4 * k:
        return torch.topk(scores, k, dim=1, sorted=False)
    head = scores[:, :num_groups * group].unflatten(1, (group, num_groups))  # [rows, 16, G]
    top_groups = torch.topk(head.amax(1), k, dim=1, sorted=False).indices  # [rows, k]
    members = torch.gather(head, 2, top_groups[:, None, :].expand(-1, group, -1)).flatten(1)
    candidates = torch.cat([members, scores[:, num_groups * group:]], dim=1)
    values, position = torch.topk(candidates, k, dim=1, sorted=False)
    in_head = position < group * k
    member = position % k
    stride_step = torch.div(position, k, rounding_mode="floor").clamp(max=group - 1)
    head_column = top_groups.gather(1, member) + stride_step * num_groups
    column = torch.where(in_head, head_column, num_groups * group + position - group * k)
    return values, column


class _TopLists:
    """Per query: the k highest gallery scores so far (unordered), and whether each is relevant."""

    def __init__(self, num_queries: int, k: int, device):
        self.k = k
        self.values = torch.full((num_queries, k), -math.inf, device=device)
        self.relevant = torch.zeros(num_queries, k, dtype=torch.bool, device=device)

    def merge(self, start: int, values: Tensor, relevant: Tensor) -> None:
        rows = slice(start, start + values.shape[0])
        all_values = torch.cat([self.values[rows], values], dim=1)
        all_relevant = torch.cat([self.relevant[rows], relevant], dim=1)
        top, index = torch.topk(all_values, self.k, dim=1, sorted=False)
        self.values[rows], self.relevant[rows] = top, all_relevant.gather(1, index)


def _ranked_relevance(values: Tensor, relevant: Tensor, num_positions: int) -> Tensor:
    """Relevance at positions 1..num_positions: sort by score, non-relevant first among ties.
    Exact when the list holds every item scoring above its ``num_positions``-th value."""
    by_relevance = torch.sort(relevant.to(torch.uint8), dim=1, stable=True).indices
    values, relevant = values.gather(1, by_relevance), relevant.gather(1, by_relevance)
    by_score = torch.sort(values, dim=1, descending=True, stable=True).indices
    return relevant.gather(1, by_score)[:, :num_positions]


def _average_precisions(ranked: Tensor, num_relevant: Tensor, cutoff: int) -> tuple[Tensor, Tensor]:
    """(AP@R, AP@cutoff) per query from relevance at positions 1..P (P >= max(R, cutoff))."""
    positions = torch.arange(1, ranked.shape[1] + 1, device=ranked.device, dtype=torch.float64)
    gains = torch.where(ranked, ranked.cumsum(1) / positions, 0.0)
    within_r = positions[None, :] <= num_relevant[:, None]
    ap_r = (gains * within_r).sum(1) / num_relevant
    ap_cut = gains[:, :cutoff].sum(1) / num_relevant.clamp(max=cutoff)
    return ap_r, ap_cut


# ----------------------------------------------------------------------------- accumulation

class _Accumulator:
    """Per-query counts and top lists, updated one similarity block at a time.

    Captions are grouped by image (``owner`` non-decreasing). Relevance for mAP is
    ``image_key[i] == caption_key[c]``: the label ids, or image ids without labels.
    """

    def __init__(self, owner: Tensor, image_key: Tensor, caption_key: Tensor, cutoff: int,
                 t2i_lists: bool):
        num_images, num_captions, device = len(image_key), len(caption_key), owner.device
        self.owner, self.image_key, self.caption_key = owner, image_key, caption_key
        self.cutoff = cutoff
        self.best = torch.full((num_images,), -math.inf, device=device)  # best own-caption score
        self.own_ties = torch.zeros(num_images, dtype=torch.int64, device=device)
        self.positive = torch.empty(num_captions, device=device)  # S[owner(c), c]
        self.i2t_at_least = torch.zeros(num_images, dtype=torch.int64, device=device)
        self.t2i_at_least = torch.zeros(num_captions, dtype=torch.int64, device=device)
        num_keys = int(torch.maximum(image_key.max(), caption_key.max())) + 1
        self.i2t_relevant = torch.bincount(caption_key, minlength=num_keys)[image_key]
        self.t2i_relevant = torch.bincount(image_key, minlength=num_keys)[caption_key]
        # Lists of P + 1 entries: the (P+1)-th value tells whether positions 1..P are settled.
        i2t_positions = max(cutoff, int(self.i2t_relevant.max()))
        t2i_positions = max(cutoff, int(self.t2i_relevant.max()))
        self.i2t_lists = _TopLists(num_images, i2t_positions + 1, device)
        self.t2i_lists = _TopLists(num_captions, t2i_positions + 1, device) if t2i_lists else None

    def set_thresholds(self, block: Tensor, row_start: int, col_start: int) -> None:
        """From the block of the rows' own captions: each caption's positive score S[owner(c), c]
        and each image's best own-caption score."""
        num_rows, width = block.shape
        own_row = self.owner[col_start:col_start + width] - row_start
        positive = block[own_row, torch.arange(width, device=block.device)]
        best = torch.full((num_rows,), -math.inf, device=block.device)
        best = best.scatter_reduce(0, own_row, positive, reduce="amax")
        ties = torch.zeros(num_rows, dtype=torch.int64, device=block.device)
        self.own_ties[row_start:row_start + num_rows] = ties.scatter_add(
            0, own_row, (positive >= best[own_row]).long())
        self.positive[col_start:col_start + width] = positive
        self.best[row_start:row_start + num_rows] = best

    def add_block(self, block: Tensor, row_start: int, col_start: int) -> None:
        num_rows, width = block.shape
        rows, cols = slice(row_start, row_start + num_rows), slice(col_start, col_start + width)
        self.i2t_at_least[rows] += _count_at_least(block, self.best[rows, None], dim=1)
        self.t2i_at_least[cols] += _count_at_least(block, self.positive[None, cols], dim=0)
        values, column = _top_values(block, min(self.i2t_lists.k, width))
        relevant = self.caption_key[col_start + column] == self.image_key[rows, None]
        self.i2t_lists.merge(row_start, values, relevant)
        if self.t2i_lists is not None:
            values, row = _top_values(block.t(), min(self.t2i_lists.k, num_rows))
            relevant = self.image_key[row_start + row] == self.caption_key[cols, None]
            self.t2i_lists.merge(col_start, values, relevant)

    def finish(self, images: Tensor, captions: Tensor, cfg: MetricsConfig) -> dict[str, float]:
        # Own captions scoring >= best (the best one and exact ties with it) don't count.
        i2t_rank = 1 + self.i2t_at_least - self.own_ties
        t2i_rank = self.t2i_at_least  # the own image is one of the images >= the positive score
        step = max(1, cfg.chunk_size * cfg.caption_chunk_size // max(len(images), len(captions)))

        def i2t_rows(index):
            relevant = self.caption_key[None, :] == self.image_key[index, None]
            return images[index] @ captions.T, relevant

        def t2i_rows(index):
            scores = (images @ captions[index].T).T  # same orientation as the blocks
            return scores, self.image_key[None, :] == self.caption_key[index, None]

        i2t_ap = self._list_precisions(self.i2t_lists, self.i2t_relevant, i2t_rows, step)
        if self.t2i_lists is not None:
            t2i_ap = self._list_precisions(self.t2i_lists, self.t2i_relevant, t2i_rows, step)
        else:  # one relevant item, found at rank_c
            reciprocal = 1.0 / t2i_rank.double()
            t2i_ap = (t2i_rank == 1).double(), torch.where(t2i_rank <= self.cutoff, reciprocal, 0.0)
        return _summarize(i2t_rank, t2i_rank, i2t_ap, t2i_ap, cfg)

    def _list_precisions(self, lists: _TopLists, num_relevant: Tensor, score_rows, step: int):
        num_positions = lists.k - 1
        ranked = _ranked_relevance(lists.values, lists.relevant, num_positions)
        kth_values = torch.topk(lists.values, 2, dim=1, largest=False).values  # sorted ascending
        last, after = kth_values[:, 1], kth_values[:, 0]  # the P-th and (P+1)-th highest
        # A tie across the list's end may hide equal items: redo those queries with a full sort.
        unsettled = torch.nonzero((last == after) & torch.isfinite(after)).flatten()
        for index in unsettled.split(step) if len(unsettled) else ():
            scores, relevant = score_rows(index)
            ranked[index] = _ranked_relevance(scores, relevant, num_positions)
        return _average_precisions(ranked, num_relevant, self.cutoff)


def _summarize(i2t_rank, t2i_rank, i2t_ap, t2i_ap, cfg: MetricsConfig) -> dict[str, float]:
    """The metric dict from 1-based ranks and per-query (AP@R, AP@cutoff) pairs."""
    ranks = {"i2t": np.asarray(torch.as_tensor(i2t_rank).cpu()),
             "t2i": np.asarray(torch.as_tensor(t2i_rank).cpu())}
    out: dict[str, float] = {}
    for direction, rank in ranks.items():
        for k in cfg.ks:
            out[f"{direction}_r{k}"] = 100.0 * int((rank <= k).sum()) / len(rank)
    for direction, rank in ranks.items():
        out[f"{direction}_medr"] = float(math.floor(np.median(rank)))
        out[f"{direction}_meanr"] = int(rank.sum()) / len(rank)
    out["rsum"] = math.fsum(out[f"{d}_r{k}"] for d in ranks for k in cfg.ks)
    for direction, (ap_r, ap_cut) in (("i2t", i2t_ap), ("t2i", t2i_ap)):
        ap_r = torch.as_tensor(ap_r, dtype=torch.float64).tolist()
        ap_cut = torch.as_tensor(ap_cut, dtype=torch.float64).tolist()
        out[f"{direction}_mapr"] = 100.0 * math.fsum(ap_r) / len(ap_r)
        out[f"{direction}_map{cfg.map_cutoff}"] = 100.0 * math.fsum(ap_cut) / len(ap_cut)
    return out


# ----------------------------------------------------------------------------- public API

@torch.no_grad()
def retrieval_metrics(image_emb: Tensor, caption_emb: Tensor, caption_owner: Tensor, *,
                      image_labels: Sequence[Hashable] | None = None, chunk_size: int = 1024,
                      caption_chunk_size: int = 32768, ks: Sequence[int] = (1, 5, 10),
                      map_cutoff: int = 50) -> dict[str, float]:
    """All retrieval metrics (definitions in the module docstring) for one gallery.

    image_emb [N, D], caption_emb [C, D] (same device); caption_owner [C]: index of each caption's
    image. Returns i2t_r{k}, t2i_r{k} (percent), i2t_medr, t2i_medr, i2t_meanr, t2i_meanr, rsum,
    i2t_mapr, t2i_mapr, i2t_map{map_cutoff}, t2i_map{map_cutoff} (percent). This is the COCO 5K
    protocol when given the 5,000 test images; ``coco_1k_metrics`` gives the 1K one.

    Memory beyond the inputs: one block of chunk_size x caption_chunk_size scores (128 MiB at the
    defaults) and O(N + C) per-query state; captions not grouped by image are grouped first (a
    copy of caption_emb). With labels, mAP keeps each query's top max(R, map_cutoff) + 1 scores,
    so that state grows with the largest category: N x (captions in it) + C x (images in it).
    """
    cfg = MetricsConfig(chunk_size, caption_chunk_size, tuple(ks), map_cutoff)
    cfg.validate()
    images, captions, owner, labels = _check_inputs(image_emb, caption_emb, caption_owner,
                                                    image_labels)
    if not bool((owner[1:] >= owner[:-1]).all()):
        order = torch.sort(owner, stable=True).indices
        captions, owner = captions[order], owner[order]
    num_images, num_captions = len(images), len(captions)
    own_end = torch.bincount(owner, minlength=num_images).cumsum(0).tolist()
    image_key = labels if labels is not None else torch.arange(num_images, device=owner.device)
    acc = _Accumulator(owner, image_key, image_key[owner], map_cutoff, labels is not None)
    row_blocks = _balanced_chunks(num_images, chunk_size)
    own_columns = [(own_end[start - 1] if start else 0, own_end[stop - 1])
                   for start, stop in row_blocks]
    # Own-caption blocks first: they hold every threshold the other blocks are counted against.
    for (start, stop), (col_start, col_stop) in zip(row_blocks, own_columns):
        block = images[start:stop] @ captions[col_start:col_stop].T
        acc.set_thresholds(block, start, col_start)
        acc.add_block(block, start, col_start)
    for (start, stop), (col_start, col_stop) in zip(row_blocks, own_columns):
        for lo, hi in (_offset_chunks(0, col_start, caption_chunk_size)
                       + _offset_chunks(col_stop, num_captions, caption_chunk_size)):
            acc.add_block(images[start:stop] @ captions[lo:hi].T, start, lo)
    return acc.finish(images, captions, cfg)


def _offset_chunks(start: int, stop: int, max_size: int) -> list[tuple[int, int]]:
    if stop <= start:
        return []
    return [(start + a, start + b) for a, b in _balanced_chunks(stop - start, max_size)]


def coco_1k_metrics(image_emb: Tensor, caption_emb: Tensor, caption_owner: Tensor, *,
                    folds: int = 5, image_labels: Sequence[Hashable] | None = None,
                    metrics_fn=None, **kwargs) -> dict[str, float]:
    """COCO 1K protocol: split the images into ``folds`` runs of N/folds consecutive images (each
    with its captions), evaluate each fold alone and average every metric over the folds.
    ``metrics_fn`` defaults to ``retrieval_metrics`` (``brute_force_metrics`` for a reference)."""
    metrics_fn = metrics_fn or retrieval_metrics
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    images, _, owner, _ = _check_inputs(image_emb, caption_emb, caption_owner, image_labels)
    num_images = len(images)
    if num_images < folds or num_images % folds:
        raise ValueError(f"coco_1k_metrics needs a number of images divisible into {folds} folds "
                         f"of consecutive images, got {num_images} images")
    fold_size = num_images // folds
    results = []
    for fold in range(folds):
        start, stop = fold * fold_size, (fold + 1) * fold_size
        keep = (owner >= start) & (owner < stop)
        results.append(metrics_fn(image_emb[start:stop], caption_emb[keep], owner[keep] - start,
                                  image_labels=None if image_labels is None
                                  else image_labels[start:stop], **kwargs))
    return {key: math.fsum(r[key] for r in results) / folds for key in results[0]}


@torch.no_grad()
def brute_force_metrics(image_emb: Tensor, caption_emb: Tensor, caption_owner: Tensor, *,
                        image_labels: Sequence[Hashable] | None = None,
                        chunk_size: int | None = None, caption_chunk_size: int | None = None,
                        ks: Sequence[int] = (1, 5, 10), map_cutoff: int = 50) -> dict[str, float]:
    """Slow reference with the same definitions and keys: one full similarity matrix, then for
    every query a full sort of the gallery (score descending, non-relevant first among ties).
    The chunk sizes are accepted for a signature like ``retrieval_metrics`` and ignored."""
    cfg = MetricsConfig(ks=tuple(ks), map_cutoff=map_cutoff)
    cfg.validate()
    images, captions, owner, labels = _check_inputs(image_emb, caption_emb, caption_owner,
                                                    image_labels)
    scores = (images @ captions.T).cpu().numpy()
    owner = owner.cpu().numpy()
    image_key = labels.cpu().numpy() if labels is not None else np.arange(len(images))
    caption_key = image_key[owner]
    image_ids = np.arange(len(images))
    i2t = [_query_stats(scores[i], owner == i, caption_key == image_key[i], map_cutoff)
           for i in range(len(images))]
    t2i = [_query_stats(scores[:, c], image_ids == owner[c], image_key == caption_key[c],
                        map_cutoff) for c in range(len(captions))]
    i2t_rank, i2t_ap_r, i2t_ap_cut = zip(*i2t)
    t2i_rank, t2i_ap_r, t2i_ap_cut = zip(*t2i)
    return _summarize(torch.tensor(i2t_rank), torch.tensor(t2i_rank), (i2t_ap_r, i2t_ap_cut),
                      (t2i_ap_r, t2i_ap_cut), cfg)


def _query_stats(scores: np.ndarray, own: np.ndarray, relevant: np.ndarray, cutoff: int):
    """(rank of the first own item, AP@R, AP@cutoff) for one query, by sorting the gallery."""
    order = np.lexsort((own, -scores))  # last key first: score descending, then non-own first
    rank = 1 + int(np.flatnonzero(own[order])[0])
    ranked = relevant[np.lexsort((relevant, -scores))]
    num_relevant = int(relevant.sum())
    precision = np.cumsum(ranked) / np.arange(1, len(ranked) + 1)
    ap_r = float(precision[:num_relevant][ranked[:num_relevant]].sum()) / num_relevant
    ap_cut = float(precision[:cutoff][ranked[:cutoff]].sum()) / min(num_relevant, cutoff)
    return rank, ap_r, ap_cut
