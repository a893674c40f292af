"""The geometric median's fast form (distances from matrix-vector products on centred points) against the direct
Weiszfeld iteration it replaced: same start, same weights, same stopping rule, so the same result to float64
rounding. (Robustness, the collinear case and the empty sample: tests/saes/test_base.py.)"""

from __future__ import annotations

import pytest
import torch

from saeforge.saes import geometric_median


def weiszfeld_direct(points, iterations=20, eps=1e-8, tol=1e-6):
    """The direct form: an [N, d] difference per iteration."""
    pts = points.reshape(-1, points.shape[-1]).to(torch.float64)
    median = pts.mean(0)
    steps = 0
    for _ in range(iterations):
        dist = (pts - median).norm(dim=1).clamp_min(eps)
        w = 1.0 / dist
        new = (w[:, None] * pts).sum(0) / w.sum()
        shift = (new - median).norm()
        median = new
        steps += 1
        if shift <= tol * (median.norm() + eps):
            break
    return median, steps


def _activation_like(n, d, seed):
    """Points like a residual stream's: a large common offset, a few heavy directions, some outliers."""
    g = torch.Generator().manual_seed(seed)
    offset = 3.0 * torch.randn(d, generator=g, dtype=torch.float64)
    scales = torch.rand(d, generator=g, dtype=torch.float64) * 2 + 0.1
    scales[:3] = 20.0
    pts = offset + torch.randn(n, d, generator=g, dtype=torch.float64) * scales
    pts[: n // 50] += 50.0 * torch.randn(n // 50, d, generator=g, dtype=torch.float64)
    return pts


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tol, iterations", [(1e-6, 20), (0.0, 40)])
def test_matches_the_direct_iteration(seed, tol, iterations):
    pts = _activation_like(4096, 48, seed)
    want, steps = weiszfeld_direct(pts, iterations=iterations, tol=tol)
    assert steps >= 3  # the comparison covers several iterations, not just the mean
    got = geometric_median(pts, iterations=iterations, tol=tol)
    assert got.dtype == torch.float64
    assert float((got - want).norm() / want.norm()) < 1e-12


def test_float32_input_gives_the_direct_iterations_float32_result():
    pts = _activation_like(8192, 64, 3).float()
    want, _ = weiszfeld_direct(pts)
    got = geometric_median(pts)
    assert got.dtype == torch.float32
    # both round the same float64 estimate (they agree to ~1e-15) to float32: at most one ulp apart anywhere
    assert torch.allclose(got, want.float(), rtol=2 ** -23, atol=0)


def test_far_from_the_origin():
    """Centring keeps |p|² - 2p·c + |c|² exact enough when the points sit far from 0 (a 1e4 offset)."""
    pts = _activation_like(2048, 16, 4) + 1e4
    want, _ = weiszfeld_direct(pts, iterations=30, tol=0.0)
    got = geometric_median(pts, iterations=30, tol=0.0)
    assert float((got - want).norm() / (want - pts.mean(0)).norm()) < 1e-9


def test_a_median_on_a_data_point_and_the_callers_tensor():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [100.0, 0.0]], dtype=torch.float64)
    before = pts.clone()
    got = geometric_median(pts, iterations=200)  # lands on [2, 0]: the eps clamp keeps the weights finite
    want, _ = weiszfeld_direct(pts, iterations=200)
    assert torch.isfinite(got).all() and torch.allclose(got, want, rtol=0, atol=1e-9)
    assert torch.equal(pts, before)  # float64 input is not converted, so it must not be centred in place
    one = torch.tensor([[1.5, -2.0, 3.0]])
    assert torch.equal(geometric_median(one), one[0])
