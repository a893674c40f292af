"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen, Nanda 2025, arXiv 2503.17547), fixed-prefix flavour.

The latents are split into consecutive groups of sizes ``group_sizes`` (summing to d_sae); prefix i holds
groups 0..i, i.e. the first m_i = sum(group_sizes[:i+1]) latents. The BatchTopK code f is computed **once** over
all latents; each prefix reconstructs with its own latents only:

    x_hat_i = f[:, :m_i] @ W_dec[:m_i] + b_dec
    L = Σ_i w_i ||x - x_hat_i||² + auxk(on the full reconstruction)

Choices: the weights w_i default to 1 (the paper's App. B code sums the per-prefix errors; dictionary_learning
averages them with w_i = 1/G, a difference of scale only); the bias-only "empty prefix" term of the Bussmann repo
is not included. The full-dictionary term is named ``"mse"`` (the same quantity as every other architecture's);
proper prefixes are ``"mse_prefix_<m_i>"``. Inference is BatchTopK's (a JumpReLU with the learned global threshold),
and AuxK is applied to the residual of the full reconstruction.

Random prefixes (``prefix_sampling="random"``, Nabeshima's variant, arXiv 2503.17547 App. C and
github.com/noanabeshima/matryoshka-saes): every step draws ``random_prefixes - 1`` distinct prefix lengths m in
[``min_prefix``, d_sae) with P(m) ∝ (m/d_sae)^p − ((m−1)/d_sae)^p (a truncated Pareto, p = ``pareto_power`` = 0.5,
so short prefixes are drawn most), adds d_sae, and sums the squared errors of those prefixes as the fixed flavour
sums its groups'; the term of the full dictionary stays ``"mse"``, the drawn ones are ``"mse_random_prefixes"``.
(Nabeshima averages over the prefixes, a difference of scale; his latent re-sorting by activation frequency is not
done.) The groups keep their meaning for analyses that read them as levels. The draws use the global torch RNG,
which checkpoints carry, so a resumed run draws the same prefixes.

Default groups (``group_sizes`` left out, :func:`default_group_sizes`): nested prefixes of d_sae/16, d_sae/8,
d_sae/4, d_sae/2 and d_sae latents, i.e. groups of d_sae/16, /16, /8, /4, /2. From the second group on each group
doubles, as in the paper's nesting (arXiv 2503.17547: groups 2048, 4096, 8192, 16384, then the rest of d_sae
65536). The first prefix is 1/16 of the dictionary rather than the paper's 1/32 because saeforge's dictionaries are
usually far smaller, and a first level of a few dozen latents would hold too few features to be a useful coarse
dictionary. Sizes are rounded down and prefixes that round to 0 or repeat are dropped, so a small d_sae still gets
a valid split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from saeforge.kernels import SparseLatents
from saeforge.saes.base import SAEConfig, TrainOutput, TrainState, _is_int, _is_number, _require, option_fix
from saeforge.saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from saeforge.saes.registry import register_sae
from saeforge.saes.topk import _fired_and_l0

__all__ = ["PREFIX_SAMPLINGS", "MatryoshkaConfig", "MatryoshkaSAE", "default_group_sizes", "sample_prefixes"]

PREFIX_SAMPLINGS = ("fixed", "random")

DEFAULT_PREFIX_FRACTIONS = (16, 8, 4, 2, 1)  # prefix m_i = d_sae // fraction


def default_group_sizes(d_sae: int) -> tuple[int, ...]:
    """Group sizes for nested prefixes of d_sae/16, /8, /4, /2 and d_sae latents (see the module docstring)."""
    prefixes = sorted({d_sae // f for f in DEFAULT_PREFIX_FRACTIONS} - {0})
    return tuple(b - a for a, b in zip([0, *prefixes], prefixes))


@dataclass(frozen=True)
class MatryoshkaConfig(BatchTopKConfig):
    architecture: ClassVar[str] = "matryoshka"

    # Sizes of the consecutive latent groups; must sum to d_sae. E.g. the paper's Gemma setup:
    # (2048, 4096, 8192, 16384, 34816) for d_sae = 65536. Empty: default_group_sizes(d_sae).
    group_sizes: tuple[int, ...] = ()
    # Weight of each prefix's squared error (same length as group_sizes); None -> all 1.
    group_weights: tuple[float, ...] | None = None
    # "fixed": the prefixes that end each group; "random": prefixes drawn anew every step (Nabeshima's variant).
    prefix_sampling: str = "fixed"
    # Random prefixes per step, the full dictionary included; the shortest one allowed; the Pareto power.
    random_prefixes: int = 10
    min_prefix: int = 1
    pareto_power: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.group_sizes, list):
            self._set("group_sizes", tuple(self.group_sizes))
        if isinstance(self.group_weights, list):
            self._set("group_weights", tuple(self.group_weights))
        super().__post_init__()
        a = self.architecture
        if self.group_sizes == ():
            self._set("group_sizes", default_group_sizes(self.d_sae))
        gs = self.group_sizes
        _require(isinstance(gs, tuple) and len(gs) > 0 and all(_is_int(g) and g > 0 for g in gs),
                 f"{a}: group_sizes must be a non-empty list of positive integers, got {gs!r}",
                 option_fix(self, "group_sizes", list(default_group_sizes(self.d_sae)),
                            f"(they add up to d_sae = {self.d_sae}), or leave group_sizes out for that default"))
        _require(sum(gs) == self.d_sae, f"{a}: group_sizes sum to {sum(gs)}, but d_sae={self.d_sae}",
                 option_fix(self, "group_sizes", list(default_group_sizes(self.d_sae)),
                            f"(sizes adding up to d_sae = {self.d_sae}), or leave group_sizes out for that default"))
        if self.group_weights is None:
            self._set("group_weights", tuple(1.0 for _ in gs))
        gw = self.group_weights
        _require(isinstance(gw, tuple) and len(gw) == len(gs) and all(_is_number(w) and w >= 0 for w in gw),
                 f"{a}: group_weights must hold {len(gs)} non-negative numbers, got {gw!r}",
                 option_fix(self, "group_weights", [1.0] * len(gs), "(one per group), or leave it out (all 1)"))
        _require(self.prefix_sampling in PREFIX_SAMPLINGS, f"{a}: unknown prefix_sampling {self.prefix_sampling!r}",
                 option_fix(self, "prefix_sampling", "random", f"(one of {', '.join(PREFIX_SAMPLINGS)})"))
        if self.prefix_sampling == "random":
            self._check_random_prefixes()

    def _check_random_prefixes(self) -> None:
        a = self.architecture
        _require(_is_int(self.min_prefix) and 1 <= self.min_prefix < self.d_sae,
                 f"{a}: min_prefix must be an integer in [1, d_sae) = [1, {self.d_sae}), got {self.min_prefix!r}",
                 option_fix(self, "min_prefix", 1))
        _require(_is_int(self.random_prefixes) and 1 <= self.random_prefixes <= self.d_sae - self.min_prefix + 1,
                 f"{a}: random_prefixes must be an integer in [1, {self.d_sae - self.min_prefix + 1}] (the full "
                 f"dictionary and the distinct lengths from min_prefix on), got {self.random_prefixes!r}",
                 option_fix(self, "random_prefixes", min(10, self.d_sae - self.min_prefix + 1)))
        _require(_is_number(self.pareto_power) and self.pareto_power > 0,
                 f"{a}: pareto_power must be a positive number, got {self.pareto_power!r}",
                 option_fix(self, "pareto_power", 0.5, "(Nabeshima's)"))

    @property
    def prefix_sizes(self) -> tuple[int, ...]:
        """m_1 < m_2 < ... < m_G = d_sae."""
        out, total = [], 0
        for g in self.group_sizes:
            total += g
            out.append(total)
        return tuple(out)


def sample_prefixes(d_sae: int, n: int, min_prefix: int = 1, power: float = 0.5,
                    generator: torch.Generator | None = None) -> list[int]:
    """``n - 1`` distinct prefix lengths in [min_prefix, d_sae) with P(m) ∝ (m/d)^p − ((m−1)/d)^p, and d_sae; sorted."""
    lengths = torch.arange(min_prefix, d_sae, dtype=torch.float64)
    weights = (lengths / d_sae).pow(power) - ((lengths - 1) / d_sae).pow(power)
    drawn = torch.multinomial(weights, n - 1, replacement=False, generator=generator) if n > 1 else lengths[:0].long()
    return sorted(int(lengths[i]) for i in drawn) + [d_sae]


def _columns(lat: SparseLatents, start: int, stop: int) -> SparseLatents:
    """The entries of ``lat`` with start <= col < stop, re-indexed to that column range (order preserved)."""
    keep = (lat.cols >= start) & (lat.cols < stop)
    return SparseLatents(lat.values[keep], lat.rows[keep], lat.cols[keep] - start, (lat.shape[0], stop - start))


@register_sae
class MatryoshkaSAE(BatchTopKSAE):
    config_class: ClassVar[type[SAEConfig]] = MatryoshkaConfig
    cfg: MatryoshkaConfig

    def training_loss(self, x: Tensor, target: Tensor | None = None, *, state: TrainState) -> TrainOutput:
        x, target = self._check_batch(x, target)
        lat, aux = self._encode_sparse(x, dead_mask=state.dead_mask,
                                       matmul_dtype=self._matmul_dtype)
        # Decode group by group and accumulate: prefix i's reconstruction is the running sum after group i.
        x_hat = self.b_dec.expand(x.shape[0], -1)
        terms: dict[str, Tensor] = {}
        start = 0
        if self.cfg.prefix_sampling == "random":
            prefixes = sample_prefixes(self.cfg.d_sae, self.cfg.random_prefixes, self.cfg.min_prefix,
                                       self.cfg.pareto_power)
            weights = [1.0] * len(prefixes)
            terms["mse_random_prefixes"] = x.new_zeros(())
        else:
            prefixes, weights = self.cfg.prefix_sizes, self.cfg.group_weights
        for i, (stop, w) in enumerate(zip(prefixes, weights)):
            x_hat = x_hat + self._decode_sparse(_columns(lat, start, stop), self.W_dec[start:stop])
            err = self._squared_error(x_hat, target)
            if i == len(prefixes) - 1:
                terms["mse"] = w * err
            elif self.cfg.prefix_sampling == "random":
                terms["mse_random_prefixes"] = terms["mse_random_prefixes"] + w * err
            else:
                terms[f"mse_prefix_{stop}"] = w * err
            start = stop
        terms["auxk"] = self._auxk_term(aux, target, x_hat)
        fired, l0 = _fired_and_l0(lat)
        self._after_training_forward(lat, state)
        return TrainOutput(loss=sum(terms.values()), terms=terms, x_hat=x_hat, fired=fired, l0=l0)
