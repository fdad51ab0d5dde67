"""All-gather with gradients, so a rank's queries can use every rank's samples as negatives.

The pattern (open_clip's "gather_with_grad + local_loss"): each rank gathers the embeddings of
all ranks, but computes only the loss terms whose *query* is one of its own samples. A rank's
samples then appear as candidates in every other rank's loss, so the gradient that belongs to
them is spread over all ranks. The backward of the gather therefore sums the incoming gradient
over ranks and keeps this rank's slice; together with the gradient of the local query path this
gives every rank exactly d(global loss)/d(its embeddings).

Every rank must run backward through the gather (it issues a collective), which is what a
data-parallel step does anyway.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_MAX_GATHER_DIMS = 8


def distributed_world(group=None) -> tuple[int, int]:
    """(rank, world_size) of ``group``; (0, 1) when torch.distributed is not in use."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _check_equal_shapes(x: torch.Tensor, world_size: int, group) -> None:
    # all_gather needs the same shape everywhere; a mismatch would otherwise hang or fail deep
    # inside the backend. Every rank sees the same gathered shapes, so every rank raises.
    if x.dim() > _MAX_GATHER_DIMS:
        raise ValueError(f"gather_with_grad: at most {_MAX_GATHER_DIMS} dims, got {x.dim()}")
    padding = [0] * (_MAX_GATHER_DIMS - x.dim())
    shape = torch.tensor([x.dim(), *x.shape, *padding], device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        sizes = [tuple(s[1 : 1 + int(s[0])].tolist()) for s in shapes]
        raise ValueError(
            f"gather_with_grad: tensor shapes differ across ranks {sizes}; cross-rank negatives "
            "need the same per-rank batch size (use drop_last=True in the data loader)"
        )


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's ``x`` along dim 0. Backward: sum over ranks, own slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, world_size: int, group) -> torch.Tensor:
        ctx.rank, ctx.group, ctx.local_size = rank, group, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor):
        # Each rank holds the gradient of *its* loss w.r.t. all gathered rows; rank r's rows need
        # the sum of those over ranks. Clone: all_reduce works in place and autograd owns the input.
        grad = grad_gathered.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.local_size
        return grad[start : start + ctx.local_size], None, None, None


def gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] from all ranks along dim 0 -> [world_size * B, ...].

    Rows ``rank * B : (rank + 1) * B`` are this rank's ``x``. Gradients flow back to the local
    ``x`` summed over ranks (see the module docstring). All ranks must pass the same shape;
    a mismatch raises a one-line ``ValueError`` on every rank. Without an initialised process
    group, or with one rank, ``x`` itself is returned.
    """
    rank, world_size = distributed_world(group)
    if world_size == 1:
        return x
    _check_equal_shapes(x, world_size, group)
    return _AllGatherWithGrad.apply(x, rank, world_size, group)


def gather_no_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Like ``gather_with_grad`` for tensors that need no gradient (ids, labels)."""
    rank, world_size = distributed_world(group)
    if world_size == 1:
        return x
    _check_equal_shapes(x, world_size, group)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)
