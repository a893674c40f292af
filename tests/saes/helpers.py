"""Small configs of every architecture (and both ReLU variants), shared by the SAE tests."""

from __future__ import annotations

import pytest
import torch

from saeforge.saes import (
    BatchTopKConfig,
    GatedConfig,
    JumpReLUConfig,
    MatryoshkaConfig,
    ReLUConfig,
    TopKConfig,
    make_sae,
)

D_IN, D_SAE = 12, 32


def config_for(name: str, d_in: int = D_IN, d_sae: int = D_SAE, **overrides):
    """The config of variant ``name`` (architecture name, or relu_april / relu_classic)."""
    if name in ("relu", "relu_april"):
        return ReLUConfig(d_in=d_in, d_sae=d_sae, **overrides)
    if name == "relu_classic":
        return ReLUConfig(d_in=d_in, d_sae=d_sae, variant="classic", **overrides)
    if name == "topk":
        return TopKConfig(d_in=d_in, d_sae=d_sae, **{"k": 4, **overrides})
    if name == "batchtopk":
        return BatchTopKConfig(d_in=d_in, d_sae=d_sae, **{"k": 4, **overrides})
    if name == "matryoshka":
        return MatryoshkaConfig(d_in=d_in, d_sae=d_sae, **{"k": 4, "group_sizes": (4, 12, d_sae - 16), **overrides})
    if name == "gated":
        return GatedConfig(d_in=d_in, d_sae=d_sae, **overrides)
    if name == "jumprelu":
        # A bandwidth and threshold at the scale of randn inputs, so the pseudo-gradients are not all zero.
        return JumpReLUConfig(d_in=d_in, d_sae=d_sae, **{"bandwidth": 0.5, "threshold_init": 0.3, **overrides})
    raise KeyError(name)


VARIANTS = ["relu_april", "relu_classic", "topk", "batchtopk", "matryoshka", "gated", "jumprelu"]
TOPK_FAMILY = {"topk", "batchtopk", "matryoshka"}


@torch.no_grad()
def randomise(sae, seed: int = 0) -> None:
    """Non-trivial biases/thresholds so that tests exercise every parameter (fresh SAEs have zero biases)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sae.named_parameters():
        if name.startswith("b_") or name == "r_mag":
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    if hasattr(sae, "log_threshold"):
        sae.log_threshold.copy_(torch.log(0.2 + 0.3 * torch.rand(sae.cfg.d_sae, generator=g)))
    if sae.architecture in ("batchtopk", "matryoshka"):
        sae.threshold.fill_(0.4)


def build(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    sae = make_sae(config_for(name, **overrides))
    randomise(sae, seed)
    return sae


@pytest.fixture(params=VARIANTS)
def variant(request) -> str:
    return request.param


def batch(n: int = 64, d: int = D_IN, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def num(v) -> float:
    """A Python float from a tensor (detached: parameters require grad) or a number."""
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
