"""Shared config validation, the geometric median, the dead-latent tracker."""

from __future__ import annotations

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.saes import DeadLatentTracker, ReLUConfig, TopKConfig, TrainState, geometric_median, make_sae

from .helpers import num


@pytest.mark.parametrize("kwargs, match", [
    ({"d_in": 0, "d_sae": 8}, "d_in must be a positive integer"),
    ({"d_in": 8, "d_sae": -1}, "d_sae must be a positive integer"),
    ({"d_in": True, "d_sae": 8}, "d_in must be a positive integer"),
    ({"d_in": 8.0, "d_sae": 8}, "d_in must be a positive integer"),
    ({"d_in": 8, "d_sae": 8, "d_out": 0}, "d_out must be a positive integer"),
    ({"d_in": 8, "d_sae": 8, "dtype": "float8"}, "unknown dtype"),
    ({"d_in": 8, "d_sae": 8, "b_dec_init": "median"}, "unknown b_dec_init"),
    ({"d_in": 8, "d_sae": 8, "d_out": 4, "apply_b_dec_to_input": True}, "must be false for a transcoder"),
    ({"d_in": 8, "d_sae": 8, "apply_b_dec_to_input": "yes"}, "true or false"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(SaeforgeError, match=match) as err:
        ReLUConfig(**kwargs)
    assert err.value.fix  # every error says what to do


def test_configs_are_frozen_and_resolve_defaults():
    cfg = TopKConfig(d_in=8, d_sae=16, k=2, dtype="torch.bfloat16")
    assert cfg.dtype == "bfloat16" and cfg.torch_dtype == torch.bfloat16
    with pytest.raises(AttributeError):
        cfg.k = 3  # type: ignore[misc]
    transcoder = TopKConfig(d_in=8, d_sae=16, k=2, d_out=4)
    assert transcoder.apply_b_dec_to_input is False and transcoder.is_transcoder and transcoder.d_output == 4
    same_width = TopKConfig(d_in=8, d_sae=16, k=2, d_out=8)
    assert not same_width.is_transcoder and same_width.apply_b_dec_to_input is True


def test_geometric_median_is_robust_and_minimises_the_distance_sum():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(500, 5, generator=g, dtype=torch.float64)
    pts[:20] += 1000.0  # outliers drag the mean, not the median
    med = geometric_median(pts, iterations=100)
    assert num(med.norm()) < 0.5 < num(pts.mean(0).norm())

    def cost(p):
        return num((pts - p).norm(dim=1).sum())

    for _ in range(20):
        assert cost(med) <= cost(med + 0.01 * torch.randn(5, generator=g, dtype=torch.float64))


def test_geometric_median_of_collinear_points_is_the_median():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [100.0, 0.0]])
    assert torch.allclose(geometric_median(pts, iterations=200), torch.tensor([2.0, 0.0]), atol=1e-2)


def test_geometric_median_errors_on_empty_sample():
    with pytest.raises(SaeforgeError, match="empty"):
        geometric_median(torch.zeros(0, 3))


def test_init_from_data_mean_and_transcoder_target():
    sae = make_sae(TopKConfig(d_in=4, d_sae=8, k=2, b_dec_init="mean"))
    x = torch.randn(100, 4)
    sae.init_from_data(x)
    assert torch.allclose(sae.b_dec, x.mean(0), atol=1e-6)
    tc = make_sae(TopKConfig(d_in=4, d_sae=8, k=2, d_out=3))
    tc.init_from_data(x)  # no target sample: b_dec (an output-space bias) stays zero
    assert num(tc.b_dec.abs().sum()) == 0
    target = torch.randn(100, 3) + 2.0
    tc.init_from_data(x, target)
    assert torch.allclose(tc.b_dec, geometric_median(target), atol=1e-6)


def test_dead_latent_tracker():
    tracker = DeadLatentTracker(4, threshold_tokens=100)
    assert not bool(tracker.dead_mask.any())
    tracker.update(torch.tensor([True, False, False, False]), n_tokens=60)
    assert tracker.dead_mask.tolist() == [False, False, False, False]
    dead = tracker.update(torch.tensor([False, True, False, False]), n_tokens=60)
    assert dead.tolist() == [False, False, True, True]
    assert tracker.tokens_since_fired.tolist() == [60, 0, 120, 120]


def test_training_batch_shape_is_checked():
    sae = make_sae(TopKConfig(d_in=4, d_sae=8, k=2))
    with pytest.raises(SaeforgeError, match=r"\[N, 4\]"):
        sae.training_loss(torch.randn(2, 3, 4), state=TrainState())
    with pytest.raises(SaeforgeError, match="target must be"):
        sae.training_loss(torch.randn(5, 4), torch.randn(4, 4), state=TrainState())
