"""Steering by an SNMF feature, its strength calibrated to a target KL divergence (arXiv 2506.10920's protocol).

Two ways to act on feature i with neuron pattern z_i at ``layers.N.mlp_hidden``, at every non-special position
(through :class:`~saeforge.interventions.steering.Steerer` and ``LanguageModel.edit``):

- ``add``: x ← x + s·z_i/‖z_i‖ (the paper adds α·v with v = z/‖z‖ at every position of the MLP's hidden layer);
  through the down projection this adds s·W_out z_i/‖z_i‖ to the residual stream;
- ``scale``: the feature's neurons (the support of z_i) are multiplied by 1 + s (s > 0 amplifies, s < 0 gives
  1/(1 + |s|), towards ablation).

The strength is found by bisection (on a log scale, since KL grows roughly as s²) until the next-token KL divergence
KL(p_clean ‖ p_steered) at the last position of the calibration prompts (the paper's "I think that") is within
``rel_tol`` of the target. The paper searches α in [1, 2000] with 20 steps and silently drops targets it misses; here
a target the strength range cannot reach is reported as missed (``reached`` False) with the nearest strength.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import torch

from saeforge.errors import SaeforgeError

MODES = ("add", "scale")
CALIBRATION_PROMPTS = ("I think that",)


@dataclass(frozen=True)
class Calibration:
    """The strength found for one target KL."""

    target: float
    strength: float
    kl: float
    reached: bool
    steps: int

    def to_dict(self) -> dict:
        return asdict(self)


def bisect_strength(kl_at: Callable[[float], float], target: float, *, lo: float, hi: float, steps: int = 30,
                    rel_tol: float = 0.05, sign: float = 1.0) -> Calibration:
    """The strength magnitude in [lo, hi] whose KL (``kl_at(sign × s)``) is within ``rel_tol`` of ``target``,
    assuming KL grows with s; geometric bisection."""
    if not (target > 0 and math.isfinite(target)):
        raise SaeforgeError(f"target KL {target} is not a positive number", "pass --target-kl 0.1 (nats)")
    if not 0 < lo < hi:
        raise SaeforgeError(f"strength range [{lo}, {hi}] is empty", "pass 0 < --min-strength < --max-strength")
    kl_hi = kl_at(sign * hi)
    if kl_hi < target * (1 - rel_tol):
        return Calibration(target, sign * hi, kl_hi, False, 1)
    kl_lo = kl_at(sign * lo)
    if kl_lo > target * (1 + rel_tol):
        return Calibration(target, sign * lo, kl_lo, False, 2)
    best = (abs(kl_hi - target), hi, kl_hi)
    for step in range(steps):
        mid = math.sqrt(lo * hi)
        kl = kl_at(sign * mid)
        if abs(kl - target) < best[0]:
            best = (abs(kl - target), mid, kl)
        if abs(kl - target) <= rel_tol * target:
            return Calibration(target, sign * mid, kl, True, step + 3)
        lo, hi = (mid, hi) if kl < target else (lo, mid)
    _, s, kl = best
    return Calibration(target, sign * s, kl, abs(kl - target) <= rel_tol * target, steps + 2)


class VectorSteering:
    """Directions added at one site (SNMF, SAE decoder rows, DiffMeans), or a feature's neurons scaled, with
    next-token KL against the clean model: what the calibration and the comparison share."""

    def __init__(self, lm, site: str, policy=None, prompts: Sequence[str] = CALIBRATION_PROMPTS):
        from saeforge.interventions.steering import Steerer

        self.lm = lm
        self.site = lm.site(site)
        self.steerer = Steerer(lm, {}, {}, policy)
        self.prompts = list(prompts)
        if not self.prompts:
            raise SaeforgeError("no calibration prompt", "pass --calibration-prompts 'I think that'")
        self._clean: torch.Tensor | None = None

    @contextlib.contextmanager
    def adding(self, vector: torch.Tensor) -> Iterator[None]:
        """``vector`` added at the site at every non-special position (BOS and padding keep their values)."""
        with self.steerer.steering(vectors={self.site.name: vector.float()}):
            yield

    @contextlib.contextmanager
    def scaling(self, neurons: torch.Tensor, factor: float) -> Iterator[None]:
        """The given neurons multiplied by ``factor`` at every non-special position."""
        special = torch.tensor(self.lm.special_token_ids())
        idx = neurons.to(self.lm.device)

        def scale(x, ctx):
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            if ctx.input_ids is not None:
                mask &= ~torch.isin(ctx.input_ids, special.to(ctx.input_ids.device)).to(x.device)
            out = x.clone()
            sel = out[:, :, idx]
            out[:, :, idx] = torch.where(mask[..., None], sel * factor, sel)
            return out

        with self.lm.edit({self.site: scale}):
            yield

    def _last_logprobs(self) -> torch.Tensor:
        from saeforge.data.prompts import PromptEncoder

        batch = PromptEncoder(self.lm, self.steerer.policy).batch(self.prompts, padding="left")
        logits = self.lm.logits(batch.input_ids, batch.attention_mask)[:, -1].float()
        return torch.log_softmax(logits, -1)

    def kl(self, edit: Callable[[], contextlib.AbstractContextManager]) -> float:
        """Mean over the prompts of KL(p_clean ‖ p_edited) of the next token after each prompt, in nats."""
        if self._clean is None:
            self._clean = self._last_logprobs()
        with edit():
            steered = self._last_logprobs()
        p = self._clean.exp()
        return float((p * (self._clean - steered)).sum(-1).clamp_min(0).mean())

    def calibrate_vector(self, direction: torch.Tensor, target: float, *, sign: float = 1.0, lo: float = 1e-2,
                         hi: float = 1e4, steps: int = 30, rel_tol: float = 0.05) -> Calibration:
        """The norm s of s·direction/‖direction‖ whose KL hits ``target``."""
        unit = direction.float() / direction.float().norm().clamp_min(1e-12)
        return bisect_strength(lambda s: self.kl(lambda: self.adding(s * unit)), target, lo=lo, hi=hi, steps=steps,
                               rel_tol=rel_tol, sign=sign)


def scale_factor(strength: float) -> float:
    """``scale`` mode: 1 + s for s ≥ 0, 1/(1 + |s|) for s < 0."""
    return 1.0 + strength if strength >= 0 else 1.0 / (1.0 - strength)


class SNMFSteering(VectorSteering):
    """Steering by the features of one SNMF fit at its site."""

    def __init__(self, lm, fit, site: str, policy=None, prompts: Sequence[str] = CALIBRATION_PROMPTS):
        from saeforge.neurons.mlp import mlp_site

        mlp_site(lm, site)
        super().__init__(lm, site, policy, prompts)
        if fit.d != self.site.d:
            raise SaeforgeError(f"the fit has {fit.d} neurons, {site} of this model has {self.site.d}",
                                "steer with the model and site the SNMF was fitted on")
        self.fit = fit

    def check(self, feature: int, mode: str) -> None:
        if mode not in MODES:
            raise SaeforgeError(f"unknown SNMF steering mode {mode!r}", f"use one of {', '.join(MODES)}")
        if not 0 <= feature < self.fit.rank:
            raise SaeforgeError(f"feature {feature} is out of range: the fit has features 0..{self.fit.rank - 1}",
                                f"pick a feature below {self.fit.rank}")

    def direction(self, feature: int) -> torch.Tensor:
        z = self.fit.features[feature].float()
        return z / z.norm().clamp_min(1e-12)

    @contextlib.contextmanager
    def steering(self, feature: int, strength: float, mode: str = "add") -> Iterator[None]:
        self.check(feature, mode)
        if not math.isfinite(strength):
            raise SaeforgeError(f"strength {strength} is not finite", "pass a finite --strength")
        if mode == "add":
            with self.adding(strength * self.direction(feature)):
                yield
        else:
            with self.scaling(self.fit.neurons(feature), scale_factor(strength)):
                yield

    def calibrate(self, feature: int, target: float, *, mode: str = "add", sign: float = 1.0, lo: float | None = None,
                  hi: float | None = None, steps: int = 30, rel_tol: float = 0.05) -> Calibration:
        """The strength of ``feature`` (signed by ``sign``) whose next-token KL on the calibration prompts is
        ``target`` within ``rel_tol``. Ranges: add, a norm in [0.01, 10⁴]; scale, s in [0.01, 10³]."""
        self.check(feature, mode)
        lo = lo if lo is not None else 1e-2
        hi = hi if hi is not None else (1e4 if mode == "add" else 1e3)
        return bisect_strength(lambda s: self.kl(lambda: self.steering(feature, s, mode)), target, lo=lo, hi=hi,
                               steps=steps, rel_tol=rel_tol, sign=sign)
