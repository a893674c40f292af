"""Synthetic activations with a known dictionary: sparse combinations of unit directions in superposition.

Each sample is x = Σ_i c_i d_i (+ optional isotropic noise), where the d_i are ``n_features`` random unit
directions in R^d (more features than dimensions, so they overlap), feature i is active independently with
probability p_i, and an active feature's magnitude is ``scale_i · m`` with a per-feature typical scale ``scale_i``
(log-uniform over ``scale_range``) and a per-occurrence draw m (log-normal with median 1, or exponential with
mean 1). The frequencies follow a power law, p_i ∝ (i + 1)^(-frequency_exponent), rescaled so that the expected
number of active features per sample (the true L0) is ``mean_active``.

An SAE that recovers the dictionary has, for every true direction, a decoder row pointing the same way;
:func:`mean_max_cosine` measures that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from saeforge.errors import SaeforgeError

__all__ = ["MAGNITUDE_DISTRIBUTIONS", "SparseFeatureModel", "SyntheticData", "generate_synthetic",
           "max_cosines", "mean_max_cosine"]

MAGNITUDE_DISTRIBUTIONS = ("lognormal", "exponential")


class SyntheticData(NamedTuple):
    data: Tensor             # [n_samples, d]
    true_directions: Tensor  # [n_features, d], unit rows
    true_codes: Tensor       # [n_samples, n_features], non-negative, sparse


def _power_law_frequencies(n: int, mean_active: float, exponent: float) -> Tensor:
    """p_i ∝ (i+1)^-exponent with Σ p_i = mean_active and every p_i <= 1 (mass above 1 is spread over the rest)."""
    raw = torch.arange(1, n + 1, dtype=torch.float64).pow(-exponent)
    p = raw * (mean_active / raw.sum())
    for _ in range(100):  # water-filling: clip at 1 and rescale the unclipped ones
        over = p > 1
        if not bool(over.any()):
            break
        p[over] = 1.0
        free = ~over & (p < 1)
        p[free] *= (mean_active - float(p[~free].sum())) / float(p[free].sum())
    return p.clamp(max=1.0)


@dataclass
class SparseFeatureModel:
    """The ground truth: directions, frequencies and scales. Draw samples with :meth:`sample`."""

    directions: Tensor   # [n_features, d] unit rows
    frequencies: Tensor  # [n_features] activation probabilities
    scales: Tensor       # [n_features] typical magnitude of each feature
    magnitude: str = "lognormal"
    magnitude_sigma: float = 0.5
    noise_std: float = 0.0

    @classmethod
    def create(cls, d: int = 64, n_features: int = 256, *, mean_active: float = 8.0,
               frequency_exponent: float = 0.5, scale_range: tuple[float, float] = (0.5, 2.0),
               magnitude: str = "lognormal", magnitude_sigma: float = 0.5, noise_std: float = 0.0,
               seed: int = 0) -> SparseFeatureModel:
        if not (isinstance(d, int) and d > 0 and isinstance(n_features, int) and n_features > 0):
            raise SaeforgeError(f"d and n_features must be positive integers, got {d!r}, {n_features!r}",
                                "e.g. d=64, n_features=256")
        if not 0 < mean_active <= n_features:
            raise SaeforgeError(f"mean_active must be in (0, n_features={n_features}], got {mean_active!r}",
                                "it is the expected number of active features per sample")
        if magnitude not in MAGNITUDE_DISTRIBUTIONS:
            raise SaeforgeError(f"unknown magnitude distribution {magnitude!r}",
                                f"use one of {', '.join(MAGNITUDE_DISTRIBUTIONS)}")
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise SaeforgeError(f"scale_range must satisfy 0 < low <= high, got {scale_range!r}", "e.g. (0.5, 2.0)")
        g = torch.Generator().manual_seed(int(seed))
        directions = torch.randn(n_features, d, generator=g, dtype=torch.float64)
        directions = directions / directions.norm(dim=1, keepdim=True)
        frequencies = _power_law_frequencies(n_features, float(mean_active), float(frequency_exponent))
        u = torch.rand(n_features, generator=g, dtype=torch.float64)
        scales = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        return cls(directions.float(), frequencies.float(), scales.float(), magnitude, float(magnitude_sigma),
                   float(noise_std))

    @property
    def d(self) -> int:
        return int(self.directions.shape[1])

    @property
    def n_features(self) -> int:
        return int(self.directions.shape[0])

    @property
    def mean_active(self) -> float:
        """The expected L0 of the true codes."""
        return float(self.frequencies.double().sum())

    def sample(self, n_samples: int, *, generator: torch.Generator | None = None,
               seed: int | None = None) -> tuple[Tensor, Tensor]:
        """(data [n, d], codes [n, n_features]) — pass a generator (or a seed) for reproducible draws."""
        if generator is None:
            generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        n = int(n_samples)
        active = torch.rand(n, self.n_features, generator=generator) < self.frequencies
        if self.magnitude == "lognormal":
            m = torch.exp(self.magnitude_sigma * torch.randn(n, self.n_features, generator=generator))
        else:
            m = -torch.log1p(-torch.rand(n, self.n_features, generator=generator))  # Exp(1)
        codes = active * m * self.scales
        data = codes @ self.directions
        if self.noise_std > 0:
            data = data + self.noise_std * torch.randn(n, self.d, generator=generator)
        return data, codes


def generate_synthetic(n_samples: int, d: int = 64, n_features: int = 256, *, mean_active: float = 8.0,
                       frequency_exponent: float = 0.5, scale_range: tuple[float, float] = (0.5, 2.0),
                       magnitude: str = "lognormal", magnitude_sigma: float = 0.5, noise_std: float = 0.0,
                       seed: int = 0) -> SyntheticData:
    """A seeded dataset: ``(data, true_directions, true_codes)``. See the module docstring for the model."""
    model = SparseFeatureModel.create(d, n_features, mean_active=mean_active, frequency_exponent=frequency_exponent,
                                      scale_range=scale_range, magnitude=magnitude, magnitude_sigma=magnitude_sigma,
                                      noise_std=noise_std, seed=seed)
    data, codes = model.sample(n_samples, seed=int(seed) + 1)
    return SyntheticData(data, model.directions, codes)


def max_cosines(decoder_rows: Tensor, true_directions: Tensor) -> Tensor:
    """For each true direction [n, d], the largest cosine similarity with any learned decoder row [m, d]."""
    if decoder_rows.dim() != 2 or true_directions.dim() != 2 or decoder_rows.shape[1] != true_directions.shape[1]:
        raise SaeforgeError(f"expected decoder rows [m, d] and true directions [n, d], got "
                            f"{tuple(decoder_rows.shape)} and {tuple(true_directions.shape)}",
                            "pass sae.W_dec (rows are latents) and the generator's directions")
    dec = decoder_rows.detach().float()
    dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    true = true_directions.detach().float().to(dec.device)
    true = true / true.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (true @ dec.T).max(dim=1).values


def mean_max_cosine(decoder_rows: Tensor, true_directions: Tensor) -> float:
    """Mean over true features of the best cosine with a learned decoder row (1.0 = every feature recovered)."""
    return float(max_cosines(decoder_rows, true_directions).mean())
