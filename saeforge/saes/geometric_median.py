"""The geometric median (Weiszfeld's algorithm): the robust centre ``b_dec`` is initialised to."""

from __future__ import annotations

import torch
from torch import Tensor

from saeforge.errors import SaeforgeError

__all__ = ["geometric_median"]


@torch.no_grad()
def geometric_median(points: Tensor, *, iterations: int = 20, eps: float = 1e-8, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to ``points`` [N, d].

    Starts from the mean; each iteration is the distance-weighted mean with weights 1/max(dist, eps) (the
    clamp avoids division by zero when the estimate lands on a data point). Computed in float64 for stability.
    """
    pts = points.detach().reshape(-1, points.shape[-1]).to(torch.float64)
    if pts.shape[0] == 0:
        raise SaeforgeError("geometric_median got an empty sample", "pass at least one activation vector")
    median = pts.mean(0)
    for _ in range(iterations):
        dist = (pts - median).norm(dim=1).clamp_min(eps)
        w = 1.0 / dist
        new = (w[:, None] * pts).sum(0) / w.sum()
        shift = (new - median).norm()
        median = new
        if shift <= tol * (median.norm() + eps):
            break
    return median.to(points.dtype)
