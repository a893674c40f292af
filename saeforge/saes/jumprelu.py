"""JumpReLU SAE (Rajamanoharan et al. 2024, arXiv 2407.14435; Gemma Scope, arXiv 2408.05147).

    π = W_enc x + b_enc            (x - b_dec when apply_b_dec_to_input; off by default, as in the released SAEs)
    f = JumpReLU_θ(π) = π · H(π - θ),   θ = exp(log_threshold) > 0 per latent
    L = ||x - x_hat||² + λ Σ_i H(π_i - θ_i)        (an L0 penalty)

H has zero derivative almost everywhere, so θ is trained with straight-through pseudo-derivatives from a kernel
density estimate with the rectangle kernel K(u) = 1[-1/2 < u < 1/2] and bandwidth ε:

    ∂JumpReLU/∂θ = -(θ/ε) K((π - θ)/ε)      ∂JumpReLU/∂π = H(π - θ)
    ∂H/∂θ        = -(1/ε) K((π - θ)/ε)      ∂H/∂π        = 0

(the paper's choice: no pseudo-gradient reaches π through the step; Anthropic's 2025 variant differs there).
The training parameter is ``log_threshold`` (Gemma Scope code), so θ stays positive and moves multiplicatively;
saving writes θ itself under SAELens' name ``threshold``. Decoder rows are kept at unit norm (Gemma Scope), which
keeps the latent scale, and hence what ε means, fixed. ε must match the activation scale: normalise the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from saeforge.saes.base import SAE, SAEConfig, TrainOutput, TrainState, _flatten, _is_number, _require, option_fix
from saeforge.saes.registry import register_sae

__all__ = ["JumpReLUConfig", "JumpReLUFunction", "JumpReLUSAE", "StepFunction", "rectangle"]


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1 for -1/2 < u < 1/2, else 0 (open interval, as in the reference code)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """``z · H(z - θ)`` with the straight-through pseudo-derivative for θ. θ broadcasts against z."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = float(bandwidth)
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad_out * (z > theta).to(grad_out.dtype)
        grad_theta = -(theta / eps) * rectangle((z - theta) / eps) * grad_out
        return grad_z, grad_theta.sum_to_size(theta.shape), None


class StepFunction(torch.autograd.Function):
    """``H(z - θ)`` with the straight-through pseudo-derivative for θ and none for z."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = float(bandwidth)
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * rectangle((z - theta) / eps) * grad_out
        return torch.zeros_like(z), grad_theta.sum_to_size(theta.shape), None


@dataclass(frozen=True)
class JumpReLUConfig(SAEConfig):
    architecture: ClassVar[str] = "jumprelu"
    sparsity_coefficient_field: ClassVar[str | None] = "l0_coefficient"
    default_learning_rate: ClassVar[float] = 3e-3

    # λ of the L0 penalty; sets the L0 you end up with (θ settles near sqrt(λ)). For E||x|| = sqrt(d_in) inputs
    # (expected_norm); chosen in docs/defaults.md.
    l0_coefficient: float = 1.0
    # ε and the initial θ for expected_norm inputs: θ must start near sqrt(λ), since log θ moves ~lr per step (Gemma
    # Scope's 0.001 / 0.001 are for unit_mean_squared inputs and 10^5+ steps). docs/defaults.md
    bandwidth: float = 0.1
    threshold_init: float = 1.0
    # Optional (off by default; not in the paper): Anthropic's Jan 2025 pre-activation loss for dead latents,
    # λ_P Σ_{i dead} ReLU(θ_i - π_i) ||W_dec,i||, which gives latents that never reach their threshold (and so
    # get no gradient at all otherwise) a push back towards it. Needs TrainState.dead_mask.
    pre_act_loss_coefficient: float = 0.0

    def _default_apply_b_dec_to_input(self) -> bool:
        # The paper's formula and the released Gemma Scope SAEs do not subtract b_dec.
        return False

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(_is_number(self.pre_act_loss_coefficient) and self.pre_act_loss_coefficient >= 0,
                 f"jumprelu: pre_act_loss_coefficient must be a non-negative number, got {self.pre_act_loss_coefficient!r}",
                 option_fix(self, "pre_act_loss_coefficient", 0.0, "(the paper's recipe)"))
        for name in ("bandwidth", "threshold_init"):
            v = getattr(self, name)
            _require(_is_number(v) and v > 0, f"jumprelu: {name} must be a positive number, got {v!r}",
                     option_fix(self, name, 0.001, "(Gemma Scope's, with --normalize-activations unit_mean_squared)"))
        _require(_is_number(self.l0_coefficient) and self.l0_coefficient >= 0,
                 f"jumprelu: l0_coefficient must be a non-negative number, got {self.l0_coefficient!r}",
                 option_fix(self, "l0_coefficient", 0.001, "(higher: sparser, lower: denser)"))


@register_sae
class JumpReLUSAE(SAE):
    config_class: ClassVar[type[SAEConfig]] = JumpReLUConfig
    cfg: JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(
            torch.full((cfg.d_sae,), float(torch.log(torch.tensor(cfg.threshold_init, dtype=torch.float64))),
                       dtype=cfg.torch_dtype))

    @property
    def threshold(self) -> Tensor:
        return torch.exp(self.log_threshold)

    def _pre(self, x: Tensor) -> Tensor:
        return self._encoder_input(x) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        x2, lead = _flatten(x, self.cfg.d_in, "the input")
        pre = self._pre(x2)
        f = pre * (pre > self.threshold).to(pre.dtype)
        return f.reshape(*lead, self.cfg.d_sae)

    def training_loss(self, x: Tensor, target: Tensor | None = None, *, state: TrainState) -> TrainOutput:
        x, target = self._check_batch(x, target)
        pre = self._pre(x)
        theta = self.threshold
        f = JumpReLUFunction.apply(pre, theta, self.cfg.bandwidth)
        x_hat = f @ self.W_dec + self.b_dec
        l0 = StepFunction.apply(pre, theta, self.cfg.bandwidth).sum(-1).mean()
        terms = {
            "mse": self._squared_error(x_hat, target),
            "l0": self.cfg.l0_coefficient * float(state.sparsity_scale) * l0,
        }
        if self.cfg.pre_act_loss_coefficient > 0:
            terms["pre_act"] = self._pre_act_term(pre, theta, state.dead_mask)
        fired, l0_value = self._sparsity_stats(f.detach() > 0)
        return TrainOutput(loss=sum(terms.values()), terms=terms, x_hat=x_hat, fired=fired, l0=l0_value)

    def _pre_act_term(self, pre: Tensor, theta: Tensor, dead_mask: Tensor | None) -> Tensor:
        if dead_mask is None:
            return pre.new_zeros(())
        dead = dead_mask.to(pre.device).bool()
        if not bool(dead.any()):
            return pre.new_zeros(())
        gap = torch.relu(theta[dead] - pre[:, dead]) * self.W_dec[dead].norm(dim=1)
        return self.cfg.pre_act_loss_coefficient * gap.sum(-1).mean()

    @torch.no_grad()
    def _scale_latents(self, factor: Tensor) -> None:
        super()._scale_latents(factor)
        self.log_threshold.add_(torch.log(factor.to(torch.float64)).to(self.dtype))

    def saelens_architecture(self) -> str:
        return "jumprelu_transcoder" if self.cfg.is_transcoder else "jumprelu"

    def saelens_tensors(self) -> dict[str, Tensor]:
        out = super().saelens_tensors()
        out["threshold"] = self.threshold.detach()
        return out
