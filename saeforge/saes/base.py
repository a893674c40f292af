"""The base class every SAE architecture shares.

Conventions (the same as SAELens v6, so saving needs no transposes):

- ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``; row-vector
  convention ``x @ W_enc``. ``d_out`` differs from ``d_in`` only for transcoders (input at one site, output at
  another); then ``b_dec`` lives in the output space and is never subtracted from the input.
- Inputs are ``[N, d_in]`` (``encode``/``decode``/``forward`` also accept extra leading dimensions).
- The squared error is summed over the feature dimension and averaged over the batch (``||x - x_hat||^2``, the
  papers' notation), in every architecture, so the "mse" term is comparable across them.
- ``TrainOutput.terms`` holds the *weighted* loss contributions; ``loss == sum(terms.values())``.

How the trainer drives an SAE (see :class:`SAE`)::

    sae.init_from_data(x_sample)
    for step, x in enumerate(batches):
        out = sae.training_loss(x, state=TrainState(step=step, sparsity_scale=warmup(step), dead_mask=dead))
        out.loss.backward()
        sae.before_optimizer_step()      # e.g. project out the gradient parallel to unit-norm decoder rows
        optimizer.step()
        sae.after_optimizer_step()       # e.g. renormalise decoder rows
        optimizer.zero_grad()
        dead = tracker.update(out.fired, n_tokens=len(x))
        sae.after_step(step, total_steps, dead, x, optimizer)   # dead-latent handling, e.g. resampling

The config (:mod:`saeforge.saes.config`), the step types (:mod:`saeforge.saes.training_step`) and the geometric
median live in their own modules; their names are importable from here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from saeforge.errors import SaeforgeError
from saeforge.saes.config import (  # noqa: F401 - re-exported: `from saeforge.saes.base import ...` keeps working
    B_DEC_INITS,
    DTYPES,
    SAEConfig,
    _is_int,
    _is_number,
    _require,
    option_fix,
    torch_dtype,
)
from saeforge.saes.geometric_median import geometric_median
from saeforge.saes.training_step import DeadLatentTracker, TrainOutput, TrainState  # noqa: F401 - re-exported

__all__ = [
    "B_DEC_INITS",
    "DTYPES",
    "DeadLatentTracker",
    "SAE",
    "SAEConfig",
    "TrainOutput",
    "TrainState",
    "geometric_median",
    "torch_dtype",
]


def _flatten(x: Tensor, width: int, what: str) -> tuple[Tensor, tuple[int, ...]]:
    if x.shape[-1] != width:
        raise SaeforgeError(f"{what} has last dimension {x.shape[-1]}, expected {width}",
                            "check that the activations come from the site this SAE was trained on")
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, width), lead



# --------------------------------------------------------------------------------------------------------------
# SAE
# --------------------------------------------------------------------------------------------------------------


class SAE(nn.Module):
    """Base class: parameters, decode, folding, unit-norm decoder handling, b_dec initialisation.

    Subclasses set ``config_class`` and implement ``encode`` and ``training_loss``; they may override
    ``_init_weights`` (defaults below), ``_scale_latents`` (when they own extra per-latent tensors) and the
    ``unit_norm_decoder`` property.
    """

    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    # False for architectures without a plain encoder bias (Gated has b_gate / b_mag instead).
    has_b_enc: ClassVar[bool] = True

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise SaeforgeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}",
                                "build the SAE with saeforge.saes.make_sae(cfg), which picks the class for you")
        self.cfg = cfg
        dt = cfg.torch_dtype
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, dtype=dt))
        if self.has_b_enc:
            self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_output, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_output, dtype=dt))
        self._init_weights()

    # ---- properties ----
    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    @property
    def unit_norm_decoder(self) -> bool:
        """Whether training keeps decoder rows at unit norm (gradient projection + renormalisation)."""
        return True

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    # ---- init ----
    @torch.no_grad()
    def _init_weights(self, decoder_norm: float = 1.0) -> None:
        """Random decoder directions with norm ``decoder_norm``; encoder tied to the decoder (W_enc = W_dec^T).

        Tied init as in OpenAI TopK, Gated, Gemma Scope and the April update. A transcoder cannot be tied (the
        two sides have different widths), so its encoder gets independent random unit-norm columns scaled the
        same way.
        """
        cfg = self.cfg
        w_dec = torch.randn(cfg.d_sae, cfg.d_output, dtype=torch.float32)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True) * decoder_norm
        self.W_dec.copy_(w_dec)
        if cfg.is_transcoder:
            w_enc = torch.randn(cfg.d_in, cfg.d_sae, dtype=torch.float32)
            self.W_enc.copy_(w_enc / w_enc.norm(dim=0, keepdim=True) * decoder_norm)
        else:
            self.W_enc.copy_(w_dec.T)
        self.b_dec.zero_()
        if self.has_b_enc:
            self.b_enc.zero_()

    @torch.no_grad()
    def init_from_data(self, x_sample: Tensor, target_sample: Tensor | None = None) -> None:
        """Data-dependent initialisation: ``b_dec`` from the sample (geometric median, mean, or left at zero).

        ``b_dec`` is an output-space bias, so for a transcoder it is computed from ``target_sample`` (the
        activations at the output site); without one a transcoder keeps ``b_dec`` at zero.
        """
        how = self.cfg.b_dec_init
        if how == "zeros":
            return
        sample = target_sample if target_sample is not None else (None if self.cfg.is_transcoder else x_sample)
        if sample is None:
            return
        sample, _ = _flatten(sample.to(self.device), self.cfg.d_output, "the init sample")
        center = geometric_median(sample) if how == "geometric_median" else sample.to(torch.float64).mean(0)
        self.b_dec.copy_(center.to(self.dtype))

    # ---- forward ----
    def _encoder_input(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def encode(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, f: Tensor) -> Tensor:
        f2, lead = _flatten(f, self.cfg.d_sae, "the latent tensor")
        out = f2.to(self.dtype) @ self.W_dec + self.b_dec
        return out.reshape(*lead, self.cfg.d_output)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def training_loss(self, x: Tensor, target: Tensor | None = None, *, state: TrainState) -> TrainOutput:
        raise NotImplementedError  # pragma: no cover - abstract

    # ---- shared pieces of training_loss ----
    def _check_batch(self, x: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
        if x.dim() != 2 or x.shape[1] != self.cfg.d_in:
            raise SaeforgeError(f"training batch must be [N, {self.cfg.d_in}], got {tuple(x.shape)}",
                                "flatten the token dimensions into one batch dimension first")
        x = x.to(self.dtype)
        if target is None:
            if self.cfg.is_transcoder:
                raise SaeforgeError("a transcoder needs a target batch (activations at the output site)",
                                    "call training_loss(x, target, state=...)")
            return x, x
        if target.shape != (x.shape[0], self.cfg.d_output):
            raise SaeforgeError(f"target must be [{x.shape[0]}, {self.cfg.d_output}], got {tuple(target.shape)}",
                                "pass the output-site activations of the same tokens")
        return x, target.to(self.dtype)

    @staticmethod
    def _squared_error(x_hat: Tensor, target: Tensor) -> Tensor:
        """Mean over the batch of the squared L2 error summed over features."""
        return (x_hat - target).pow(2).sum(-1).mean()

    @staticmethod
    def _sparsity_stats(acts_positive: Tensor) -> tuple[Tensor, float]:
        """From a bool [N, d_sae] 'is active' mask: (fired [d_sae], mean L0)."""
        return acts_positive.any(0), float(acts_positive.sum(1).float().mean())

    # ---- optimiser hooks ----
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """With a unit-norm decoder: remove the gradient component parallel to each decoder row.

        Together with the renormalisation in ``after_optimizer_step`` this keeps the rows on the unit sphere
        and stops the optimiser from spending its step on a norm change that would be undone (ConstrainedAdam).
        """
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        g = self.W_dec.grad
        g -= (g * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def after_step(self, step: int, total_steps: int, dead_mask: Tensor, x: Tensor,
                   optimizer: torch.optim.Optimizer) -> None:
        """Called by the trainer once step ``step`` (0-based, of ``total_steps``) is complete and the dead-latent
        counter updated: the architecture's own dead-latent handling (e.g. resampling). ``x`` is the step's input
        batch (scaled as the SAE sees it), ``dead_mask`` bool [d_sae]. Default: nothing (AuxK-style losses read
        ``TrainState.dead_mask`` instead)."""

    # ---- folding ----
    @torch.no_grad()
    def _scale_latents(self, factor: Tensor) -> None:
        """Rescale the encoder so every latent's activation is multiplied by ``factor`` [d_sae] (> 0).

        Subclasses extend this with their own per-latent tensors (thresholds, gate biases).
        """
        self.W_enc.mul_(factor.to(self.dtype)[None, :])
        if self.has_b_enc:
            self.b_enc.mul_(factor.to(self.dtype))

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """Make every decoder row unit norm without changing the function: f_i *= ||d_i||, d_i /= ||d_i||."""
        norms = self.W_dec.norm(dim=1)
        if bool((norms == 0).any()):
            raise SaeforgeError("cannot fold decoder norms: some decoder rows are exactly zero",
                                "remove or re-initialise those latents first")
        self.W_dec.div_(norms[:, None])
        self._scale_latents(norms)

    @torch.no_grad()
    def fold_input_scale(self, scale_in: float, scale_out: float | None = None) -> None:
        """Fold a constant input/output scaling into the weights.

        The SAE was trained on ``x * scale_in`` with targets ``target * scale_out`` (``scale_out`` defaults to
        ``scale_in``; it differs only for transcoders). Afterwards it takes raw ``x`` and returns raw-scale
        outputs: ``folded(x) == trained(x * scale_in) / scale_out``.

        Choice: the decoder keeps its rows (unit norm stays unit norm) and the latents are divided by
        ``scale_out``, i.e. they come out in raw units: W_enc *= scale_in/scale_out, encoder biases and
        thresholds /= scale_out, b_dec /= scale_out. (dictionary_learning's ``scale_biases`` does the same.)
        """
        s_in = float(scale_in)
        s_out = s_in if scale_out is None else float(scale_out)
        _require(_is_number(s_in) and s_in > 0 and _is_number(s_out) and s_out > 0,
                 f"input/output scales must be positive finite numbers, got {scale_in!r}, {scale_out!r}",
                 "pass the scale estimated by saeforge.saes.normalization.estimate_scale")
        _require(not self.cfg.apply_b_dec_to_input or s_in == s_out,
                 "with apply_b_dec_to_input the input and output scales must be equal "
                 f"(b_dec is both), got {s_in} and {s_out}", "pass a single scale")
        self.W_enc.mul_(s_in)
        self._scale_latents(torch.full((self.cfg.d_sae,), 1.0 / s_out, dtype=torch.float64, device=self.device))
        self.b_dec.div_(s_out)

    # ---- saving ----
    def saelens_architecture(self) -> str:
        """The ``architecture`` name SAELens v6 loads this SAE as."""
        raise NotImplementedError  # pragma: no cover - abstract

    def saelens_config_extras(self) -> dict[str, Any]:
        """Architecture-specific top-level cfg.json fields for SAELens (e.g. ``k``)."""
        return {}

    def export_warnings(self) -> list[str]:
        """Things to tell the user when this SAE is saved in the SAELens layout (e.g. a lossy view)."""
        return []

    def write_extra_files(self, folder: Path, metadata: dict[str, Any],
                          feature_stats: dict[str, Tensor] | None) -> None:
        """Files an architecture saves beside its weights (an HSAE: its levels and tree). ``save_sae`` calls it
        before writing cfg.json, so a folder with a cfg.json has them. Default: none."""

    def saelens_tensors(self) -> dict[str, Tensor]:
        """Inference weights under SAELens v6 names (exactly the keys SAELens' model expects)."""
        out = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.has_b_enc:
            out["b_enc"] = self.b_enc
        return {k: v.detach() for k, v in out.items()}

    def extra_tensors(self) -> dict[str, Tensor]:
        """Everything in ``state_dict()`` that ``saelens_tensors`` does not carry bit-exactly (e.g. a learned
        log-threshold, training buffers). Saved beside the SAELens weights so a saeforge load is exact."""
        saelens = self.saelens_tensors()
        return {k: v.detach() for k, v in self.state_dict().items()
                if k not in saelens or saelens[k].shape != v.shape}

    def extra_repr(self) -> str:
        c = self.cfg
        out = f"architecture={c.architecture!r}, d_in={c.d_in}, d_sae={c.d_sae}"
        return out + (f", d_out={c.d_out}" if c.is_transcoder else "")

