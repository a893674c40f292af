"""Batch statistics over the whole global batch when each rank holds a slice of it (data-parallel training).

Most SAE losses are means over the tokens of the batch: each rank's mean over its equal slice, with gradients
averaged over the ranks, is the global mean. AuxK (Gao et al., arXiv 2406.04093) is not: it divides by the
variance of the residual over the batch and multiplies by the data variance. :func:`auxk_normalisers` returns those
two over the global batch (two small all-reduces) and the factor that makes the average of the ranks' terms the
global term. BatchTopK (Bussmann et al., arXiv 2412.06410) keeps the N·k largest activations of the whole batch:
:func:`keep_global_batch_top` picks them from every rank's own N·k largest (a superset of its winners), and
:func:`global_min` gives its inference threshold the smallest of them. In one process each computes exactly what the
SAE computed before (bit-identical).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from saeforge.kernels import SparseLatents

__all__ = ["auxk_normalisers", "batch_sharded_over", "global_min", "keep_global_batch_top", "sharded_world_size"]

_world_size = 1  # ranks the current training batch is split over (1: the batch is whole in this process)


def sharded_world_size() -> int:
    return _world_size


@contextlib.contextmanager
def batch_sharded_over(world_size: int) -> Iterator[None]:
    """Within the block, training batches are one slice of a global batch split evenly over ``world_size`` ranks
    of the default process group."""
    global _world_size
    before, _world_size = _world_size, world_size
    try:
        yield
    finally:
        _world_size = before


def auxk_normalisers(e: Tensor, target: Tensor) -> tuple[Tensor, Tensor, float]:
    """(Σ‖e − mean(e)‖², mean ‖target − mean(target)‖², share) over the global batch, for the residual ``e`` and the
    ``target`` of this rank's slice; ``share`` multiplies this rank's AuxK term so the ranks' average is the global
    term (1 in one process)."""
    target = target.detach()
    if _world_size == 1:
        return (e - e.mean(0)).pow(2).sum(), (target - target.mean(0)).pow(2).sum(-1).mean(), 1.0
    n = e.shape[0] * _world_size
    sums = torch.cat([e.sum(0), target.sum(0)]).double()
    dist.all_reduce(sums)
    mean_e, mean_t = sums[:e.shape[1]] / n, sums[e.shape[1]:] / n
    squares = torch.stack([(e.double() - mean_e).pow(2).sum(), (target.double() - mean_t).pow(2).sum()])
    dist.all_reduce(squares)
    return squares[0].to(e.dtype), (squares[1] / n).to(e.dtype), float(_world_size)


def keep_global_batch_top(lat: SparseLatents, kk: int) -> SparseLatents:
    """The entries of this rank's ``lat`` that are among the ``kk`` largest values of all ranks' ``lat`` together.

    Each rank passes its own ``kk`` largest positive entries (so every global winner is among them): their values
    are all-gathered (padded with -inf to ``kk``), the ``kk``-th largest of the pool is the global threshold, and
    each rank keeps its entries at or above it (all of them when the ranks hold fewer than ``kk`` together). Exact up
    to ties at the threshold, which float32 activations make vanishingly rare."""
    values = lat.values.detach()
    mine = values.new_full((kk,), float("-inf"))
    mine[:values.numel()] = values
    pool = [torch.empty_like(mine) for _ in range(_world_size)]
    dist.all_gather(pool, mine)
    pooled = torch.cat(pool)
    threshold = pooled.topk(kk, sorted=False).values.min()
    if not bool(torch.isfinite(threshold)):  # fewer than kk candidates over all ranks: every one is kept
        return lat
    keep = values >= threshold
    return SparseLatents(lat.values[keep], lat.rows[keep], lat.cols[keep], lat.shape)


def global_min(value: Tensor) -> Tensor:
    """The smallest of the ranks' ``value`` (a scalar; +inf stands for "none on this rank")."""
    if _world_size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value
