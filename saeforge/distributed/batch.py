"""Batch statistics over the whole global batch when each rank holds a slice of it (data-parallel training).

Most SAE losses are means over the tokens of the batch: each rank's mean over its equal slice, with gradients
averaged over the ranks, is the global mean. AuxK (Gao et al., arXiv 2406.04093) is not: it divides by the
variance of the residual over the batch and multiplies by the data variance. :func:`auxk_normalisers` returns those
two over the global batch (two small all-reduces) and the factor that makes the average of the ranks' terms the
global term. In one process it computes exactly what the SAE computed before (bit-identical).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["auxk_normalisers", "batch_sharded_over", "sharded_world_size"]

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
