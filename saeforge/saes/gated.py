"""Gated SAE (Rajamanoharan et al. 2024, arXiv 2404.16014).

    x̃ = x - b_dec
    π_gate = x̃ W_gate + b_gate,   π_mag = x̃ W_mag + b_mag,   W_mag = W_gate · diag(exp(r_mag))   (r_mag sharing)
    f = 1[π_gate > 0] ⊙ ReLU(π_mag),   x_hat = f W_dec + b_dec
    L = ||x - x_hat||² + λ Σ_i ReLU(π_gate)_i + ||x - (ReLU(π_gate) W_dec.detach() + b_dec.detach())||²

``W_enc`` is W_gate (SAELens v6 names: W_enc, b_gate, b_mag, r_mag, W_dec, b_dec). The Heaviside gate passes no
gradient, so the auxiliary reconstruction through a *frozen* copy of the decoder (gdm.py) is what trains the
gate path towards reconstructing; freezing keeps it from pulling the decoder. Decoder rows are kept at unit norm
(the paper's constraint), so the plain L1 on ReLU(π_gate) equals SAELens' decoder-norm-weighted variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from saeforge.saes.base import SAE, SAEConfig, TrainOutput, TrainState, _flatten, _is_number, _require, option_fix
from saeforge.saes.registry import register_sae

__all__ = ["GatedConfig", "GatedSAE"]


@dataclass(frozen=True)
class GatedConfig(SAEConfig):
    architecture: ClassVar[str] = "gated"
    sparsity_coefficient_field: ClassVar[str | None] = "l1_coefficient"
    default_learning_rate: ClassVar[float] = 3e-3

    # λ on the gate pre-activations. Depends on the input scale like every L1 coefficient; for inputs scaled to
    # E||x|| = sqrt(d_in), tens of latents per token in short runs (docs/defaults.md).
    l1_coefficient: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(_is_number(self.l1_coefficient) and self.l1_coefficient >= 0,
                 f"gated: l1_coefficient must be a non-negative number, got {self.l1_coefficient!r}",
                 option_fix(self, "l1_coefficient", 5.0, "(for inputs scaled to E||x|| = sqrt(d_in))"))


@register_sae
class GatedSAE(SAE):
    config_class: ClassVar[type[SAEConfig]] = GatedConfig
    cfg: GatedConfig
    has_b_enc: ClassVar[bool] = False

    def __init__(self, cfg: GatedConfig):
        super().__init__(cfg)
        dt = cfg.torch_dtype
        # Gate and magnitude biases and the magnitude rescaling all start at zero (gdm.py), so W_mag = W_gate.
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))

    def _pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_tilde = self._encoder_input(x)
        pi_gate = x_tilde @ self.W_enc + self.b_gate
        pi_mag = (x_tilde @ self.W_enc) * torch.exp(self.r_mag) + self.b_mag
        return pi_gate, pi_mag

    def encode(self, x: Tensor) -> Tensor:
        x2, lead = _flatten(x, self.cfg.d_in, "the input")
        pi_gate, pi_mag = self._pre(x2)
        f = (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)
        return f.reshape(*lead, self.cfg.d_sae)

    def training_loss(self, x: Tensor, target: Tensor | None = None, *, state: TrainState) -> TrainOutput:
        x, target = self._check_batch(x, target)
        pi_gate, pi_mag = self._pre(x)
        f = (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)
        x_hat = f @ self.W_dec + self.b_dec
        gate_acts = torch.relu(pi_gate)
        x_hat_frozen = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
        terms = {
            "mse": self._squared_error(x_hat, target),
            "l1": self.cfg.l1_coefficient * float(state.sparsity_scale) * gate_acts.sum(-1).mean(),
            "aux": self._squared_error(x_hat_frozen, target),
        }
        fired, l0 = self._sparsity_stats(f > 0)
        return TrainOutput(loss=sum(terms.values()), terms=terms, x_hat=x_hat, fired=fired, l0=l0)

    @torch.no_grad()
    def _scale_latents(self, factor: Tensor) -> None:
        # Scaling W_gate's column scales W_mag's too (shared weights, r_mag unchanged); the gate only needs its sign.
        super()._scale_latents(factor)
        self.b_gate.mul_(factor.to(self.dtype))
        self.b_mag.mul_(factor.to(self.dtype))

    def saelens_architecture(self) -> str:
        # SAELens has no gated transcoder; a gated transcoder is saved as "gated" with d_out and only saeforge loads it.
        return "gated"

    def saelens_tensors(self) -> dict[str, Tensor]:
        out = {"W_enc": self.W_enc, "b_gate": self.b_gate, "b_mag": self.b_mag, "r_mag": self.r_mag,
               "W_dec": self.W_dec, "b_dec": self.b_dec}
        return {k: v.detach() for k, v in out.items()}
