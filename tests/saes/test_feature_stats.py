"""Feature statistics (sparsity.safetensors): the TopK family's come from the sparse top-k kernel, every other
architecture's from its dense ``encode``; both must equal the dense definition — per latent, log10 of the share of
vectors where it is positive, its largest value, its mean where positive."""

from __future__ import annotations

import pytest
import torch

from saeforge.saes import (
    BatchTopKConfig,
    JumpReLUConfig,
    TopKConfig,
    TopKTranscoderConfig,
    make_sae,
)
from saeforge.saes.feature_stats import _sparse_encoder, feature_statistics


def dense_reference(sae, x, chunk=4096):
    """The definition, from ``sae.encode`` in float64 sums."""
    f = torch.cat([sae.encode(x[s:s + chunk]).double() for s in range(0, x.shape[0], chunk)])
    fired = (f > 0).sum(0).float()  # whole counts: exact in float32, and the log10 of the same float32 share
    density = fired / x.shape[0]
    return {"sparsity": torch.log10(density.clamp_min(1e-10)), "max_activation": f.max(0).values.float(),
            "mean_activation": (f.sum(0) / fired.clamp_min(1)).float()}


def _randomised(sae, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)
    return sae


def _sample(n, d, seed):
    """float32 inputs, as the trainer feeds them (the SAE casts them to its own dtype)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + 0.5


@pytest.mark.parametrize("seed", [0, 1])
def test_topk_sparse_statistics_equal_the_dense_definition_in_float64(seed):
    """float64: no ties at the k-th value, so every statistic is the definition's (the mean to rounding)."""
    sae = _randomised(make_sae(TopKConfig(d_in=24, d_sae=384, k=8, dtype="float64")), seed)
    assert sae.cfg.apply_b_dec_to_input and _sparse_encoder(sae) is not None
    x = _sample(9000, 24, seed + 10)  # two whole chunks and a partial one
    got, want = feature_statistics(sae, x), dense_reference(sae, x)
    assert torch.equal(got["sparsity"], want["sparsity"]) and torch.equal(got["max_activation"],
                                                                          want["max_activation"])
    assert torch.allclose(got["mean_activation"], want["mean_activation"], rtol=1e-6, atol=0)
    assert (got["sparsity"] > -10).sum() > 300  # most latents fire: the comparison is not over zeros


@pytest.mark.parametrize("seed", [0, 1])
def test_topk_sparse_statistics_in_float32(seed):
    """float32, the shape class of a real run (the compiled kernel's selection, 16k <= d_sae): the same latents
    except where two tie at a token's k-th largest pre-activation (either may be kept); values to the ulp."""
    sae = _randomised(make_sae(TopKConfig(d_in=64, d_sae=1024, k=16)), seed)
    x = _sample(6000, 64, seed + 20)
    got, want = feature_statistics(sae, x), dense_reference(sae, x)
    with torch.no_grad():
        pre = sae._encoder_input(x) @ sae.W_enc + sae.b_enc
    kth = pre.topk(sae.cfg.k + 1, dim=1).values
    tied_rows = int((kth[:, -1] == kth[:, -2]).sum())
    count = lambda s: torch.round(10 ** s.double() * x.shape[0]).where(s > -10, torch.zeros((), dtype=torch.float64))
    assert float((count(got["sparsity"]) - count(want["sparsity"])).abs().sum()) <= 2 * tied_rows
    if tied_rows == 0:
        assert torch.equal(got["sparsity"], want["sparsity"])
    assert torch.allclose(got["max_activation"], want["max_activation"], rtol=1e-6, atol=1e-6)
    assert torch.allclose(got["mean_activation"], want["mean_activation"], rtol=1e-5, atol=1e-6)


def test_a_topk_transcoder_takes_the_sparse_path():
    sae = _randomised(make_sae(TopKTranscoderConfig(d_in=24, d_out=16, d_sae=256, k=4, dtype="float64")), 3)
    assert not sae.cfg.apply_b_dec_to_input and _sparse_encoder(sae) is not None
    x = _sample(5000, 24, 4)
    got, want = feature_statistics(sae, x), dense_reference(sae, x)
    assert torch.equal(got["sparsity"], want["sparsity"])
    assert torch.allclose(got["mean_activation"], want["mean_activation"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("config", [
    BatchTopKConfig(d_in=24, d_sae=256, k=4, dtype="float64"),
    JumpReLUConfig(d_in=24, d_sae=256, dtype="float64"),
])
def test_other_architectures_keep_the_dense_encode(config):
    sae = _randomised(make_sae(config), 5)
    if hasattr(sae, "threshold"):
        with torch.no_grad():
            sae.threshold.fill_(0.4)  # a learned BatchTopK threshold: its encode is not a per-row top-k
    assert _sparse_encoder(sae) is None
    x = _sample(5000, 24, 6)
    got, want = feature_statistics(sae, x), dense_reference(sae, x)
    assert torch.equal(got["sparsity"], want["sparsity"]) and torch.equal(got["max_activation"],
                                                                          want["max_activation"])
    assert torch.allclose(got["mean_activation"], want["mean_activation"], rtol=1e-6, atol=0)
