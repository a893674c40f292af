"""The synthetic ground-truth generator and the recovery metric."""

from __future__ import annotations

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.evals.synthetic import SparseFeatureModel, generate_synthetic, max_cosines, mean_max_cosine


def test_shapes_and_the_generative_model():
    data, directions, codes = generate_synthetic(500, d=16, n_features=48, mean_active=3.0, seed=4)
    assert data.shape == (500, 16) and directions.shape == (48, 16) and codes.shape == (500, 48)
    assert torch.allclose(directions.norm(dim=1), torch.ones(48), atol=1e-5)
    assert bool((codes >= 0).all())
    assert torch.allclose(data, codes @ directions, atol=1e-5)


def test_seeded_and_different_across_seeds():
    a = generate_synthetic(200, d=8, n_features=20, mean_active=2.0, seed=1)
    b = generate_synthetic(200, d=8, n_features=20, mean_active=2.0, seed=1)
    c = generate_synthetic(200, d=8, n_features=20, mean_active=2.0, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.data, c.data) and not torch.equal(a.true_directions, c.true_directions)


def test_sparsity_frequencies_and_magnitudes():
    model = SparseFeatureModel.create(32, 128, mean_active=3.0, frequency_exponent=1.0, scale_range=(0.5, 2.0), seed=0)
    assert model.mean_active == pytest.approx(3.0, rel=1e-5)
    p = model.frequencies
    assert bool((p[:-1] >= p[1:]).all()) and float(p[0] / p[-1]) == pytest.approx(128.0, rel=1e-3)  # p ∝ 1/i
    assert float(model.scales.min()) >= 0.5 and float(model.scales.max()) <= 2.0
    _, codes = model.sample(40_000, seed=0)
    active = codes > 0
    # mean L0 over 40k samples: its standard error is below 0.01, so 0.1 is a wide margin for any seed
    assert float(active.sum(1).float().mean()) == pytest.approx(3.0, abs=0.1)
    # per-feature firing rates follow the frequencies
    assert torch.allclose(active.float().mean(0), p, atol=0.02)
    # magnitudes spread over more than an order of magnitude
    values = codes[active]
    assert float(values.max() / values.min()) > 10


def test_frequencies_are_capped_at_one():
    model = SparseFeatureModel.create(8, 10, mean_active=8.0, frequency_exponent=2.0, seed=0)
    assert float(model.frequencies.max()) <= 1.0 and model.mean_active == pytest.approx(8.0, rel=1e-5)


def test_exponential_magnitudes_and_noise():
    model = SparseFeatureModel.create(8, 16, mean_active=2.0, magnitude="exponential", noise_std=0.1, seed=0)
    data, codes = model.sample(2000, seed=3)
    residual = data - codes @ model.directions
    assert float(residual.std()) == pytest.approx(0.1, rel=0.1)


@pytest.mark.parametrize("kwargs, match", [
    ({"mean_active": 0.0}, "mean_active"),
    ({"mean_active": 100.0}, "mean_active"),
    ({"magnitude": "gamma"}, "unknown magnitude"),
    ({"scale_range": (2.0, 1.0)}, "scale_range"),
])
def test_errors(kwargs, match):
    with pytest.raises(SaeforgeError, match=match):
        SparseFeatureModel.create(8, 16, **kwargs)


def test_mean_max_cosine():
    _, directions, _ = generate_synthetic(10, d=16, n_features=40, seed=0)
    # a decoder holding the true directions, permuted, rescaled, plus extra rows: perfect recovery
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    decoder = torch.cat([3.0 * directions[perm], torch.randn(5, 16)])
    assert mean_max_cosine(decoder, directions) == pytest.approx(1.0, abs=1e-6)
    # missing half of the features lowers the score
    partial = mean_max_cosine(directions[:20], directions)
    assert partial < 0.8
    per_feature = max_cosines(directions[:20], directions)
    assert torch.allclose(per_feature[:20], torch.ones(20), atol=1e-6) and bool((per_feature[20:] < 0.99).all())
    # random decoders score far lower
    assert mean_max_cosine(torch.randn(40, 16, generator=torch.Generator().manual_seed(1)), directions) < 0.7
    with pytest.raises(SaeforgeError, match="expected decoder rows"):
        mean_max_cosine(torch.randn(4, 8), directions)
