"""Input-scale estimation and folding the scale into a trained SAE."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.saes import ActivationScaler, TrainState, estimate_scale

from .helpers import build, num


def sample(n=2000, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 37.0 * torch.randn(n, d, generator=g) + 5.0


def test_expected_norm_makes_the_mean_norm_sqrt_d():
    x = sample()
    s = estimate_scale(x, "expected_norm")
    assert num((x * s).norm(dim=1).mean()) == pytest.approx(math.sqrt(16), rel=1e-6)


def test_unit_mean_squared_makes_the_mean_squared_norm_one():
    x = sample()
    s = estimate_scale(x, "unit_mean_squared")
    assert num((x * s).pow(2).sum(1).mean()) == pytest.approx(1.0, rel=1e-6)


def test_none_is_identity_and_errors():
    assert estimate_scale(sample(), "none") == 1.0
    with pytest.raises(SaeforgeError, match="unknown normalisation method 'l2'"):
        estimate_scale(sample(), "l2")
    with pytest.raises(SaeforgeError, match="mean norm is 0"):
        estimate_scale(torch.zeros(10, 4), "expected_norm")
    with pytest.raises(SaeforgeError, match="empty"):
        estimate_scale(torch.zeros(0, 4), "expected_norm")


def test_scaler_round_trip_and_separate_output_scale():
    x, t = sample(), 0.01 * sample(d=6, seed=1)
    scaler = ActivationScaler.fit(x, "unit_mean_squared", target_sample=t)
    assert scaler.scale_in == pytest.approx(estimate_scale(x, "unit_mean_squared"))
    assert scaler.scale_out == pytest.approx(estimate_scale(t, "unit_mean_squared"))
    assert scaler.scale_out > 100 * scaler.scale_in
    assert ActivationScaler.from_dict(scaler.to_dict()) == scaler
    with pytest.raises(SaeforgeError, match="invalid activation-scaler"):
        ActivationScaler.from_dict({"method": "none"})
    with pytest.raises(SaeforgeError, match="unknown normalisation"):
        ActivationScaler.from_dict({"method": "x", "scale_in": 1, "scale_out": 1})


def test_sae_trained_on_scaled_inputs_works_on_raw_inputs_after_folding(variant):
    x = sample(n=64, d=12)
    scaler = ActivationScaler.fit(x, "expected_norm")
    sae = build(variant)
    # a few real training steps on the scaled data, so the weights are not just the random init
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for step in range(5):
        out = sae.training_loss(scaler.scale_input(x), state=TrainState(step=step))
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
        opt.zero_grad()
    trained = copy.deepcopy(sae)
    scaler.fold_into(sae)
    raw_out = sae(x)
    assert torch.allclose(raw_out, trained(scaler.scale_input(x)) / scaler.scale_in, rtol=1e-4, atol=1e-4)
    # and it reconstructs in raw units (a ~37x larger scale than what it was trained on)
    assert num(raw_out.norm(dim=1).mean()) > 10.0
