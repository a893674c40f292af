"""ReLU SAE with an L1 penalty, in two variants (Bricken et al. 2023 and Anthropic's April 2024 update;
docs/methods.md).

``variant="april2024"`` (Anthropic, "Update on how we train SAEs", April 2024; SAELens "standard"):
    f = ReLU(W_enc x + b_enc)                      no b_dec subtraction before the encoder
    L = ||x - x_hat||^2 + λ Σ_i f_i ||W_dec,i||    L1 weighted by the decoder row norms, so no norm constraint
    init: decoder rows random with norm 0.1, W_enc = W_dec^T, biases 0.

``variant="classic"`` (Towards Monosemanticity, 2023; dictionary_learning ``AutoEncoder`` + ``ConstrainedAdam``):
    f = ReLU(W_enc (x - b_dec) + b_enc)
    L = ||x - x_hat||^2 + λ Σ_i f_i                plain L1; decoder rows kept at unit norm
    dead latents are resampled (``resample_dead_latents``) every ``resample_every`` steps (``after_step``), but
    never within the settling window at the end of the run (``resample_due``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from saeforge.errors import SaeforgeError
from saeforge.saes.base import SAE, SAEConfig, TrainOutput, TrainState, _flatten, _is_int, _is_number, _require
from saeforge.saes.config import option_fix
from saeforge.saes.registry import register_sae

__all__ = ["RELU_VARIANTS", "ReLUConfig", "ReLUSAE", "resample_due"]

RELU_VARIANTS = ("april2024", "classic")
# The last part of a run in which no resampling happens, as a fraction of the run (the floor; see resample_due).
RESAMPLE_SETTLE_FRACTION = 0.05


def resample_due(step: int, total_steps: int, every: int | None) -> bool:
    """Whether dead latents are resampled once step ``step`` (0-based) of ``total_steps`` is complete.

    Every ``every`` steps, except within a settling window at the end of the run of max(every / 2, 5 % of the
    run) steps, the final step included: a resampled latent is a fresh, untrained direction, so resampling late
    would leave it in the saved SAE untrained (and the logged metrics would not describe the saved SAE). Half the
    interval is the span over which Towards Monosemanticity judges a latent dead, so every resampled latent trains
    at least as long as a latent needs to show it is alive; the 5 % floor keeps that share of a long run when the
    interval is short.
    """
    if not every or (step + 1) % every:
        return False
    settle = max(every // 2, math.ceil(RESAMPLE_SETTLE_FRACTION * total_steps))
    return total_steps - (step + 1) >= settle


@dataclass(frozen=True)
class ReLUConfig(SAEConfig):
    architecture: ClassVar[str] = "relu"
    sparsity_coefficient_field: ClassVar[str | None] = "l1_coefficient"
    default_learning_rate: ClassVar[float] = 3e-3

    variant: str = "april2024"
    # λ, for inputs scaled so that E||x|| = sqrt(d_in) ("expected_norm"; the right value depends on the input
    # scale, so normalise first). None -> 5 for april2024 (Anthropic's value) and 2 for classic, whose plain L1 on
    # unit-norm rows switches every latent off at 5 on real residuals (docs/defaults.md).
    l1_coefficient: float | None = None
    # Norm of the random decoder rows at init. None -> 0.1 for april2024 (dictionary_learning / SAELens
    # default; the update's own prose gives a setting-dependent range), 1.0 for classic (it must be 1: unit norm).
    decoder_init_norm: float | None = None
    # classic only: resample dead latents every this many steps (the paper resampled at 25k, 50k, 75k, 100k).
    # None -> 25_000 for classic; 0 turns resampling off. Must be None or 0 for april2024.
    resample_every: int | None = None

    def _default_apply_b_dec_to_input(self) -> bool:
        return self.variant == "classic"

    def _default_b_dec_init(self) -> str:
        # The April update initialises both biases to zero; Towards Monosemanticity uses the geometric median.
        return "geometric_median" if self.variant == "classic" else "zeros"

    def __post_init__(self) -> None:
        _require(self.variant in RELU_VARIANTS, f"relu: unknown variant {self.variant!r}",
                 f"use one of {', '.join(RELU_VARIANTS)}")
        super().__post_init__()
        if self.l1_coefficient is None:
            self._set("l1_coefficient", 5.0 if self.variant == "april2024" else 2.0)
        _require(_is_number(self.l1_coefficient) and self.l1_coefficient >= 0,
                 f"relu: l1_coefficient must be a non-negative number, got {self.l1_coefficient!r}",
                 option_fix(self, "l1_coefficient", 5.0, "(for inputs scaled to E||x|| = sqrt(d_in))"))
        if self.decoder_init_norm is None:
            self._set("decoder_init_norm", 0.1 if self.variant == "april2024" else 1.0)
        _require(_is_number(self.decoder_init_norm) and self.decoder_init_norm > 0,
                 f"relu: decoder_init_norm must be positive, got {self.decoder_init_norm!r}",
                 option_fix(self, "decoder_init_norm", 0.1))
        if self.variant == "classic":
            _require(self.decoder_init_norm == 1.0,
                     f"relu classic keeps unit-norm decoder rows, but decoder_init_norm={self.decoder_init_norm}",
                     "leave decoder_init_norm out of --sae-options for the classic variant (it is 1.0)")
            if self.resample_every is None:
                self._set("resample_every", 25_000)
            _require(_is_int(self.resample_every) and self.resample_every >= 0,
                     f"relu: resample_every must be a non-negative integer, got {self.resample_every!r}",
                     option_fix(self, "resample_every", 25000, "(0 turns resampling off)"))
        else:
            _require(self.resample_every in (None, 0),
                     "relu april2024 does not resample dead latents (the decoder-norm-weighted L1 replaces it), "
                     f"but resample_every={self.resample_every}",
                     "leave resample_every out, or pass --sae-options '{\"variant\": \"classic\", "
                     f"\"resample_every\": {self.resample_every}}}'")


@register_sae
class ReLUSAE(SAE):
    config_class: ClassVar[type[SAEConfig]] = ReLUConfig
    cfg: ReLUConfig

    # Towards Monosemanticity: resampled encoder rows get norm 0.2 x the mean norm of the alive encoder rows.
    RESAMPLE_ENCODER_SCALE: ClassVar[float] = 0.2

    @property
    def unit_norm_decoder(self) -> bool:
        return self.cfg.variant == "classic"

    @torch.no_grad()
    def _init_weights(self, decoder_norm: float = 1.0) -> None:
        super()._init_weights(decoder_norm=self.cfg.decoder_init_norm)

    def _pre(self, x: Tensor) -> Tensor:
        return self._encoder_input(x) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        x2, lead = _flatten(x, self.cfg.d_in, "the input")
        return torch.relu(self._pre(x2)).reshape(*lead, self.cfg.d_sae)

    def training_loss(self, x: Tensor, target: Tensor | None = None, *, state: TrainState) -> TrainOutput:
        x, target = self._check_batch(x, target)
        f = torch.relu(self._pre(x))
        x_hat = f @ self.W_dec + self.b_dec
        mse = self._squared_error(x_hat, target)
        if self.cfg.variant == "april2024":
            l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        else:
            l1 = f.sum(-1).mean()
        terms = {"mse": mse, "l1": self.cfg.l1_coefficient * float(state.sparsity_scale) * l1}
        fired, l0 = self._sparsity_stats(f > 0)
        return TrainOutput(loss=sum(terms.values()), terms=terms, x_hat=x_hat, fired=fired, l0=l0)

    def after_step(self, step: int, total_steps: int, dead_mask: Tensor, x: Tensor,
                   optimizer: torch.optim.Optimizer) -> None:
        if self.cfg.variant == "classic" and resample_due(step, total_steps, self.cfg.resample_every):
            self.resample_dead_latents(x, dead_mask, optimizer)

    @torch.no_grad()
    def resample_dead_latents(self, x_sample: Tensor, dead_mask: Tensor,
                              optimizer: torch.optim.Optimizer | None = None, *,
                              generator: torch.Generator | None = None) -> int:
        """Towards Monosemanticity neuron resampling (Bricken et al. 2023); returns how many latents were reset.

        ``dead_mask``: bool [d_sae], the latents the trainer found inactive (the paper: no activation in the last
        ``resample_every / 2`` steps). For each dead latent an input ``x_s`` is drawn from ``x_sample`` with
        probability proportional to the *square* of its reconstruction loss ``||x - x_hat||^2`` (the paper's rule;
        dictionary_learning's code weights by the unsquared norm instead), then

            W_dec[i] = x_s / ||x_s||,   W_enc[:, i] = 0.2 * mean_alive(||W_enc[:, j]||) * x_s / ||x_s||,   b_enc[i] = 0,

        and, when ``optimizer`` (Adam-like: ``exp_avg`` / ``exp_avg_sq`` state) is given, those latents' moment
        estimates are zeroed so stale statistics do not kick them straight back.
        """
        if self.cfg.variant != "classic":
            raise SaeforgeError("dead-latent resampling belongs to the classic ReLU recipe",
                                "pass --sae-options '{\"variant\": \"classic\"}', or rely on the decoder-norm-weighted "
                                "L1 of april2024")
        dead_mask = dead_mask.to(self.device).bool()
        if dead_mask.shape != (self.cfg.d_sae,):
            raise SaeforgeError(f"dead_mask must be bool [{self.cfg.d_sae}], got {tuple(dead_mask.shape)}",
                                "pass the mask the dead-latent tracker produced")
        dead = dead_mask.nonzero().squeeze(1)
        n_dead = int(dead.numel())
        if n_dead == 0:
            return 0
        x, _ = _flatten(x_sample.to(self.device), self.cfg.d_in, "the resampling sample")
        x = x.to(self.dtype)
        err = (self.forward(x) - x).pow(2).sum(-1)  # ||x - x_hat||^2 per input
        weights = err.double().pow(2)
        usable = int((weights > 0).sum())
        if usable == 0:
            return 0  # nothing is reconstructed badly enough to learn from
        picks = torch.multinomial(weights, n_dead, replacement=n_dead > usable, generator=generator)
        directions = x[picks] / x[picks].norm(dim=1, keepdim=True).clamp_min(1e-12)
        alive = ~dead_mask
        enc_norm = self.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0)
        self.W_dec[dead] = directions.to(self.dtype)
        self.W_enc[:, dead] = (directions.T * (self.RESAMPLE_ENCODER_SCALE * enc_norm)).to(self.dtype)
        self.b_enc[dead] = 0.0
        if optimizer is not None:
            self._reset_optimizer_rows(optimizer, dead)
        return n_dead

    @torch.no_grad()
    def _reset_optimizer_rows(self, optimizer: torch.optim.Optimizer, dead: Tensor) -> None:
        where = {self.W_enc: (slice(None), dead), self.b_enc: (dead,), self.W_dec: (dead,)}
        for p, index in where.items():
            state = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and state[key].shape == p.shape:
                    state[key][index] = 0.0

    def saelens_architecture(self) -> str:
        return "transcoder" if self.cfg.is_transcoder else "standard"
