"""Hinge ranking losses (VSE++): a matching pair must outscore every negative by a margin.

Row i of ``img`` and row i of ``txt`` are a matching pair; every other row of the batch is a
negative. Scores are dot products (the encoders L2-normalise, so these are cosines). With
``s(i, j) = img_i . txt_j`` the loss has two directions:

- caption retrieval, one query per image i:  [margin + s(i, j) - s(i, i)]_+  for captions j != i
- image retrieval, one query per caption j:  [margin + s(i, j) - s(j, j)]_+  for images i != j

``max_violation=True`` keeps only the hardest negative of each query (VSE++ "MH"); ``False``
sums over all negatives (the older VSE "SH"). A pair's loss is its two query costs added;
``reduction`` sums ("sum", VSE++'s choice) or averages ("mean") those over the pairs.

Several captions of one image in a batch: VSE++ treats the other captions' image as a negative
even though it is the same picture, which pushes a true match away. Pass ``img_ids`` and pairs
that share an image id are neither negatives nor extra positives: they are left out.
"""

from __future__ import annotations

from typing import Literal

import torch

from cmr.losses.gather import distributed_world, gather_no_grad, gather_with_grad

Reduction = Literal["sum", "mean", "none"]


def _check_pairs(img: torch.Tensor, txt: torch.Tensor, img_ids: torch.Tensor | None) -> None:
    if img.dim() != 2 or img.shape != txt.shape:
        raise ValueError(
            f"ranking loss: img and txt must both be [batch, dim] of one shape, "
            f"got {tuple(img.shape)} and {tuple(txt.shape)}"
        )
    if img_ids is not None and img_ids.shape != img.shape[:1]:
        raise ValueError(
            f"ranking loss: img_ids must be [batch]={img.shape[0]}, got {tuple(img_ids.shape)}"
        )


def _excluded_negatives(
    num_queries: int,
    num_candidates: int,
    offset: int,
    query_ids: torch.Tensor | None,
    candidate_ids: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Bool [queries, candidates]: True where a candidate must not count as a negative.

    Query q's own positive sits at column ``offset + q``; with ids, every candidate that shows
    the same image is excluded as well.
    """
    rows = torch.arange(num_queries, device=device) + offset
    cols = torch.arange(num_candidates, device=device)
    excluded = rows[:, None] == cols[None, :]
    if query_ids is not None:
        excluded = excluded | (query_ids[:, None] == candidate_ids[None, :])
    return excluded


def _query_costs(
    scores: torch.Tensor, offset: int, excluded: torch.Tensor, margin: float, max_violation: bool
) -> torch.Tensor:
    """Per-query hinge cost [Q] from ``scores`` [Q, M] with query q's positive at ``offset + q``."""
    positive_cols = torch.arange(scores.shape[0], device=scores.device) + offset
    positive = scores.gather(1, positive_cols[:, None])
    # masked_fill (not multiplication by a mask) so excluded entries carry exactly zero gradient.
    cost = (margin + scores - positive).clamp(min=0).masked_fill(excluded, 0.0)
    return cost.max(dim=1).values if max_violation else cost.sum(dim=1)


def _reduce(per_pair: torch.Tensor, reduction: str, num_pairs: int) -> torch.Tensor:
    if reduction == "sum":
        return per_pair.sum()
    if reduction == "mean":
        return per_pair.sum() / num_pairs
    if reduction == "none":
        return per_pair
    raise ValueError(f"ranking loss: reduction must be 'sum', 'mean' or 'none', got {reduction!r}")


def triplet_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    margin: float = 0.2,
    max_violation: bool = True,
    reduction: Reduction = "sum",
    mask: torch.Tensor | None = None,
    img_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional hinge ranking loss over in-batch negatives (see the module docstring).

    img, txt: [B, D], row i of each is a matching pair. mask: optional bool [B, B], True where
    (image i, caption j) must not be used as a negative. img_ids: optional [B] image ids; pairs
    with equal ids are excluded from the negatives. "none" returns the per-pair loss [B].
    """
    _check_pairs(img, txt, img_ids)
    num_pairs = img.shape[0]
    scores = img @ txt.T  # [images, captions]
    excluded = _excluded_negatives(num_pairs, num_pairs, 0, img_ids, img_ids, img.device)
    if mask is not None:
        if mask.shape != scores.shape or mask.dtype != torch.bool:
            raise ValueError(f"triplet_loss: mask must be bool [{num_pairs}, {num_pairs}]")
        excluded = excluded | mask
    caption_retrieval = _query_costs(scores, 0, excluded, margin, max_violation)
    image_retrieval = _query_costs(scores.T, 0, excluded.T, margin, max_violation)
    return _reduce(caption_retrieval + image_retrieval, reduction, num_pairs)


def triplet_loss_distributed(
    img_local: torch.Tensor,
    txt_local: torch.Tensor,
    margin: float = 0.2,
    max_violation: bool = True,
    reduction: Reduction = "sum",
    img_ids: torch.Tensor | None = None,
    gather: bool = True,
    rank_reduction: Literal["mean", "sum"] = "mean",
    group=None,
) -> torch.Tensor:
    """This rank's share of the triplet loss with the negatives of all ranks (N ranks x B pairs).

    Each rank scores its own B queries (in both directions) against all N*B gathered candidates;
    the positives of rank r sit at offset r*B. ``img_ids`` are gathered too, so duplicates of an
    image on other ranks are excluded. Every rank must pass the same B.

    ``rank_reduction`` says how the caller combines ranks, and scales the result to match:
    - "mean" (DDP, DeepSpeed and Accelerate average gradients over ranks): the value is N times
      the rank's part, so the mean over ranks of the values and of the parameter gradients equals
      the single-process loss and gradients on all N*B pairs.
    - "sum": the rank's part as is; values and parameter gradients summed over ranks equal the
      single-process ones, and the gradient w.r.t. ``img_local``/``txt_local`` equals the
      single-process gradient of those rows.
    "mean" reduction divides by the global N*B. "none" returns the local per-pair loss [B]
    (unscaled). With ``gather=False``, one rank or no process group this is ``triplet_loss``.
    """
    _check_pairs(img_local, txt_local, img_ids)
    if rank_reduction not in ("mean", "sum"):
        raise ValueError(f"rank_reduction must be 'mean' or 'sum', got {rank_reduction!r}")
    rank, world_size = distributed_world(group) if gather else (0, 1)
    if world_size == 1:
        return triplet_loss(img_local, txt_local, margin, max_violation, reduction, None, img_ids)
    num_local, dim = img_local.shape
    # One collective for both modalities instead of two.
    img_all, txt_all = gather_with_grad(torch.cat([img_local, txt_local], dim=1), group).split(
        dim, dim=1
    )
    ids_all = gather_no_grad(img_ids, group) if img_ids is not None else None
    offset = rank * num_local
    excluded = _excluded_negatives(
        num_local, img_all.shape[0], offset, img_ids, ids_all, img_local.device
    )
    # Local images query all captions, local captions query all images; the exclusions are the
    # same for both because a pair's image id is shared by its caption.
    caption_retrieval = _query_costs(img_local @ txt_all.T, offset, excluded, margin, max_violation)
    image_retrieval = _query_costs(txt_local @ img_all.T, offset, excluded, margin, max_violation)
    per_pair = caption_retrieval + image_retrieval
    if reduction == "none":
        return per_pair
    loss = _reduce(per_pair, reduction, num_local * world_size)
    return loss * world_size if rank_reduction == "mean" else loss


def imagine_matching_loss(
    imagined_emb: torch.Tensor,
    img_emb: torch.Tensor,
    margin: float = 0.2,
    max_violation: bool = True,
    reduction: Reduction = "sum",
    img_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-direction hinge: imagined embedding i must retrieve its own image i among the batch.

    The triplet loss's caption-retrieval half with the imagined embeddings as queries; the
    real-image side never acts as a query, so only the "imagine -> image" direction is trained.
    """
    _check_pairs(imagined_emb, img_emb, img_ids)
    num_pairs = img_emb.shape[0]
    scores = imagined_emb @ img_emb.T  # [imagined, images]
    excluded = _excluded_negatives(num_pairs, num_pairs, 0, img_ids, img_ids, img_emb.device)
    per_query = _query_costs(scores, 0, excluded, margin, max_violation)
    return _reduce(per_query, reduction, num_pairs)
