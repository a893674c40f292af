"""Steering by an SNMF feature with its strength calibrated to a target next-token KL divergence."""

from __future__ import annotations

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.neurons.steer import SNMFSteering, bisect_strength, scale_factor

SITE = "layers.1.mlp_hidden"
PROMPTS = ("To be or not", "the winter of our")


@pytest.fixture(scope="module")
def steering(tiny_llama, tiny_snmf):
    return SNMFSteering(tiny_llama, tiny_snmf[0], SITE, prompts=PROMPTS)


@pytest.mark.parametrize("mode,sign", [("add", 1.0), ("add", -1.0), ("scale", 1.0), ("scale", -1.0)])
@pytest.mark.parametrize("target", [0.001, 0.005])  # the random tiny model saturates near 0.012
def test_calibration_hits_the_target_kl(steering, mode, sign, target):
    feature = 0 if mode == "add" else int(steering.fit.features.norm(dim=1).argmax())
    cal = steering.calibrate(feature, target, mode=mode, sign=sign, rel_tol=0.02)
    if mode == "scale" and sign < 0 and not cal.reached:
        # full ablation (factor → 0) may not move the next token by the target; then the limit is reported
        assert cal.kl < target and abs(cal.strength) == 1e3
        return
    assert cal.reached and abs(cal.kl - target) <= 0.02 * target
    assert (cal.strength > 0) == (sign > 0)
    again = steering.kl(lambda: steering.steering(feature, cal.strength, mode))  # the edit really gives that KL
    assert again == pytest.approx(cal.kl, rel=1e-4)


def test_add_moves_only_non_special_positions_by_the_unit_direction(steering, tiny_llama):
    ids = torch.tensor([[0, 40, 41, 42]])  # BOS first
    clean = tiny_llama.read(ids, [SITE])[SITE]
    with steering.steering(2, 3.0, "add"):
        with tiny_llama.record([SITE]) as rec:
            tiny_llama.logits(ids)
    moved = rec[SITE] - clean
    assert torch.allclose(moved[0, 0], torch.zeros_like(moved[0, 0]))  # BOS untouched
    expected = 3.0 * steering.direction(2)
    assert torch.allclose(moved[0, 1:], expected.expand(3, -1), atol=1e-5)


def test_scale_multiplies_exactly_the_feature_neurons(steering, tiny_llama):
    ids = torch.tensor([[0, 40, 41, 42]])
    clean = tiny_llama.read(ids, [SITE])[SITE]
    with steering.steering(1, -1.0, "scale"):
        with tiny_llama.record([SITE]) as rec:
            tiny_llama.logits(ids)
    group = steering.fit.neurons(1)
    ratio = rec[SITE][0, 1:, group] / clean[0, 1:, group]
    assert torch.allclose(ratio, torch.full_like(ratio, 0.5), atol=1e-5)
    others = torch.ones(clean.shape[-1], dtype=torch.bool)
    others[group] = False
    assert torch.equal(rec[SITE][0, :, others], clean[0, :, others])
    assert scale_factor(3.0) == 4.0 and scale_factor(-3.0) == 0.25


def test_the_bisection_reports_an_unreachable_target_and_bad_input():
    cal = bisect_strength(lambda s: min(abs(s), 1.0) * 0.1, 0.5, lo=0.01, hi=100)
    assert not cal.reached and cal.strength == 100
    cal = bisect_strength(lambda s: (s / 10) ** 2, 0.25, lo=0.01, hi=1e4, rel_tol=0.01)
    assert cal.reached and cal.strength == pytest.approx(5.0, rel=0.01)
    with pytest.raises(SaeforgeError, match="target KL"):
        bisect_strength(lambda s: s, 0.0, lo=1, hi=2)


def test_bad_features_modes_and_fits(steering, tiny_llama, tiny_snmf):
    with pytest.raises(SaeforgeError, match="out of range"):
        steering.calibrate(99, 0.1)
    with pytest.raises(SaeforgeError, match="unknown SNMF steering mode"):
        steering.calibrate(0, 0.1, mode="clamp")
    with pytest.raises(SaeforgeError, match="not an MLP hidden site"):
        SNMFSteering(tiny_llama, tiny_snmf[0], "layers.1.resid_post")
