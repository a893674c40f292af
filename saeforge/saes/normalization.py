"""One constant input scale, estimated from a data sample, and folded into the SAE after training.

Methods (docs/methods.md, "Input scaling"):
- ``"expected_norm"``: scale so that E||x|| = sqrt(d) (Anthropic April update; SAELens "expected_average_only_in").
- ``"unit_mean_squared"``: scale so that E||x||² = 1 (Gemma Scope).
- ``"none"``: scale 1.

Train on ``x * scale_in`` (and, for a transcoder, targets ``* scale_out``), then ``ActivationScaler.fold_into(sae)``
so the saved SAE takes raw activations (its cfg.json then says ``normalize_activations: "none"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from saeforge.errors import SaeforgeError

__all__ = ["NORMALIZATION_METHODS", "ActivationScaler", "estimate_scale", "site_scales"]

NORMALIZATION_METHODS = ("expected_norm", "unit_mean_squared", "none")


@torch.no_grad()
def estimate_scale(x_sample: Tensor, method: str) -> float:
    """The constant to multiply activations ``x_sample`` [..., d] by so that they meet ``method``'s target."""
    if method not in NORMALIZATION_METHODS:
        raise SaeforgeError(f"unknown normalisation method {method!r}",
                            f"use one of {', '.join(NORMALIZATION_METHODS)}")
    if method == "none":
        return 1.0
    x = x_sample.detach().reshape(-1, x_sample.shape[-1]).to(torch.float64)
    if x.shape[0] == 0:
        raise SaeforgeError("cannot estimate an input scale from an empty sample", "pass some activations")
    sq_norms = x.pow(2).sum(-1)
    if method == "expected_norm":
        mean = float(sq_norms.sqrt().mean())
        target = math.sqrt(x.shape[1])
    else:
        mean = float(sq_norms.mean())
        target = 1.0
    if not (math.isfinite(mean) and mean > 0):
        raise SaeforgeError(f"cannot estimate an input scale: the sample's mean norm is {mean}",
                            "check the activations (all zero, or containing inf/NaN?)")
    return target / mean if method == "expected_norm" else 1.0 / math.sqrt(mean)


def site_scales(scale: float | Sequence[float], n: int, what: str = "input") -> list[float]:
    """One scale per site of a multi-site dictionary: ``scale`` itself when it lists n of them, else n copies of
    the one number given; an error unless they are positive and finite."""
    values = [float(scale)] * n if isinstance(scale, (int, float)) else [float(s) for s in scale]
    if len(values) != n or not all(math.isfinite(v) and v > 0 for v in values):
        raise SaeforgeError(f"{what} scales must be {n} positive finite numbers (one per site), got {scale!r}",
                            "pass the scales the trainer estimated (one per site)")
    return values


@dataclass(frozen=True)
class ActivationScaler:
    """The scales applied during training: inputs ``* scale_in``, targets ``* scale_out``."""

    method: str = "none"
    scale_in: float = 1.0
    scale_out: float = 1.0

    @classmethod
    def fit(cls, x_sample: Tensor, method: str, target_sample: Tensor | None = None) -> ActivationScaler:
        """Estimate the input scale (and, for a transcoder, the output scale from ``target_sample``)."""
        s_in = estimate_scale(x_sample, method)
        s_out = s_in if target_sample is None else estimate_scale(target_sample, method)
        return cls(method=method, scale_in=s_in, scale_out=s_out)

    def scale_input(self, x: Tensor) -> Tensor:
        return x * self.scale_in

    def scale_target(self, target: Tensor) -> Tensor:
        return target * self.scale_out

    def fold_into(self, sae: Any) -> None:
        """Make ``sae`` (trained on scaled data) work on raw activations."""
        sae.fold_input_scale(self.scale_in, self.scale_out)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "scale_in": self.scale_in, "scale_out": self.scale_out}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ActivationScaler:
        try:
            out = cls(method=d["method"], scale_in=float(d["scale_in"]), scale_out=float(d["scale_out"]))
        except (KeyError, TypeError, ValueError) as err:
            raise SaeforgeError(f"invalid activation-scaler record {d!r}: {err}",
                                "expected {\"method\": ..., \"scale_in\": float, \"scale_out\": float}") from err
        if out.method not in NORMALIZATION_METHODS:
            raise SaeforgeError(f"unknown normalisation method {out.method!r}",
                                f"use one of {', '.join(NORMALIZATION_METHODS)}")
        return out
