"""Transcoders and skip transcoders: a sparse code of one site that predicts another (Dunefsky, Chlenski and Nanda,
arXiv 2406.11944; skip transcoders: Paulo, Shabalin and Belrose, arXiv 2501.18823).

    f = code(W_enc x + b_enc)                    x at the site read (typically the MLP's input, layers.L.mlp_in)
    ŷ = W_dec f + b_dec  (+ W_skip x)            the prediction of the site written (typically layers.L.mlp_out)
    L = ||y - ŷ||² + the code's own terms

Three codes, each the saeforge architecture of the same name trained against a target instead of its input:
``topk_transcoder`` (TopK + AuxK, through the same sparse kernels as ``topk``), ``batchtopk_transcoder`` (a learnt
global threshold at inference) and ``jumprelu_transcoder`` (L0 penalty with straight-through thresholds). The
``*_skip_transcoder`` forms add an affine skip connection ``W_skip`` [d_out, d_in] (SAELens' orientation: the skip
term is ``x @ W_skip.T``), initialised at zero as in sparsify and SAELens.

What makes them transcoders is the binding, not the widths: a residual -> residual transcoder (d_out == d_in) is one
too (``cfg.is_transcoder`` is always true here), so ``b_dec`` lives in the output space and is never subtracted from
the input, the encoder is not tied to the decoder at initialisation, and ``b_dec`` is initialised from the target.

``decode(f)`` is the sparse part only; ``forward(x)`` (= ``sae(x)``) adds the skip term, so anything that replaces
the written site should call the SAE itself. A skip transcoder is trained by fitting the sparse part to
``y - x @ W_skip.T``: the same loss, and AuxK then models the residual of the whole prediction.

Saved in SAELens' layout where SAELens has the architecture (``jumprelu_transcoder``, ``jumprelu_skip_transcoder``;
BatchTopK as the JumpReLU with its learnt threshold); a TopK transcoder is written as SAELens ``topk`` with ``d_out``
(SAELens has no TopK transcoder) and its ``W_skip`` goes to ``saeforge_state.safetensors``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from saeforge.saes.base import SAEConfig, TrainOutput, TrainState, _flatten
from saeforge.saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from saeforge.saes.jumprelu import JumpReLUConfig, JumpReLUSAE
from saeforge.saes.registry import register_sae
from saeforge.saes.topk import TopKConfig, TopKSAE

__all__ = [
    "BatchTopKSkipTranscoder",
    "BatchTopKSkipTranscoderConfig",
    "BatchTopKTranscoder",
    "BatchTopKTranscoderConfig",
    "JumpReLUSkipTranscoder",
    "JumpReLUSkipTranscoderConfig",
    "JumpReLUTranscoder",
    "JumpReLUTranscoderConfig",
    "TopKSkipTranscoder",
    "TopKSkipTranscoderConfig",
    "TopKTranscoder",
    "TopKTranscoderConfig",
    "TranscoderMixin",
]


class TranscoderConfigMixin:
    """What every transcoder config shares: always a transcoder, trained on a transcoder binding only."""

    binding_kinds: ClassVar[tuple[str, ...]] = ("transcoder",)
    # Whether the architecture has the affine skip connection W_skip.
    skip_connection: ClassVar[bool] = False

    def _default_apply_b_dec_to_input(self) -> bool:
        return False

    def __post_init__(self) -> None:
        if self.d_out is None:  # a transcoder always states its output width (SAELens needs it)
            object.__setattr__(self, "d_out", self.d_in)
        super().__post_init__()

    @property
    def is_transcoder(self) -> bool:
        return True


class TranscoderMixin:
    """The skip connection and the target-only training of a transcoder, on top of an SAE architecture."""

    cfg: Any

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        if cfg.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_output, cfg.d_in, dtype=cfg.torch_dtype))

    def skip(self, x: Tensor) -> Tensor:
        """The skip term ``x @ W_skip.T`` (zeros for a transcoder without one), [..., d_out]."""
        x2, lead = _flatten(x, self.cfg.d_in, "the input")
        if not self.cfg.skip_connection:
            return x2.new_zeros(x2.shape[0], self.cfg.d_output, dtype=self.dtype).reshape(*lead, self.cfg.d_output)
        return (x2.to(self.dtype) @ self.W_skip.T).reshape(*lead, self.cfg.d_output)

    def forward(self, x: Tensor) -> Tensor:
        out = self.decode(self.encode(x))
        return out + self.skip(x) if self.cfg.skip_connection else out

    def training_loss(self, x: Tensor, target: Tensor | None = None, *, state: TrainState) -> TrainOutput:
        x, target = self._check_batch(x, target)
        if not self.cfg.skip_connection:
            return super().training_loss(x, target, state=state)
        skip = x @ self.W_skip.T
        out = super().training_loss(x, target - skip, state=state)
        return dataclasses.replace(out, x_hat=out.x_hat + skip)

    @torch.no_grad()
    def fold_input_scale(self, scale_in: float, scale_out: float | None = None) -> None:
        s_out = scale_in if scale_out is None else scale_out
        super().fold_input_scale(scale_in, scale_out)
        if self.cfg.skip_connection:
            self.W_skip.mul_(float(scale_in) / float(s_out))

    def saelens_architecture(self) -> str:
        name = super().saelens_architecture()
        if self.cfg.skip_connection and name == "jumprelu_transcoder":
            return "jumprelu_skip_transcoder"
        return name

    def saelens_tensors(self) -> dict[str, Tensor]:
        out = super().saelens_tensors()
        if self.cfg.skip_connection and self.saelens_architecture().endswith("skip_transcoder"):
            out["W_skip"] = self.W_skip.detach()
        return out

    def export_warnings(self) -> list[str]:
        out = list(super().export_warnings())
        if self.cfg.skip_connection and not self.saelens_architecture().endswith("skip_transcoder"):
            out.append(f"{self.architecture}: SAELens has no {self.saelens_architecture()} skip transcoder; it will "
                       "load this folder without W_skip (saeforge's own loader keeps it)")
        return out


# ---------------------------------------------------------------------------------------------------- TopK
@dataclass(frozen=True)
class TopKTranscoderConfig(TranscoderConfigMixin, TopKConfig):
    architecture: ClassVar[str] = "topk_transcoder"
    plain_architecture: ClassVar[str] = "topk"


@register_sae
class TopKTranscoder(TranscoderMixin, TopKSAE):
    config_class: ClassVar[type[SAEConfig]] = TopKTranscoderConfig


@dataclass(frozen=True)
class TopKSkipTranscoderConfig(TopKTranscoderConfig):
    architecture: ClassVar[str] = "topk_skip_transcoder"
    plain_architecture: ClassVar[str | None] = None
    skip_connection: ClassVar[bool] = True


@register_sae
class TopKSkipTranscoder(TopKTranscoder):
    config_class: ClassVar[type[SAEConfig]] = TopKSkipTranscoderConfig


# ---------------------------------------------------------------------------------------------------- BatchTopK
@dataclass(frozen=True)
class BatchTopKTranscoderConfig(TranscoderConfigMixin, BatchTopKConfig):
    architecture: ClassVar[str] = "batchtopk_transcoder"
    plain_architecture: ClassVar[str] = "batchtopk"


@register_sae
class BatchTopKTranscoder(TranscoderMixin, BatchTopKSAE):
    config_class: ClassVar[type[SAEConfig]] = BatchTopKTranscoderConfig


@dataclass(frozen=True)
class BatchTopKSkipTranscoderConfig(BatchTopKTranscoderConfig):
    architecture: ClassVar[str] = "batchtopk_skip_transcoder"
    plain_architecture: ClassVar[str | None] = None
    skip_connection: ClassVar[bool] = True


@register_sae
class BatchTopKSkipTranscoder(BatchTopKTranscoder):
    config_class: ClassVar[type[SAEConfig]] = BatchTopKSkipTranscoderConfig


# ---------------------------------------------------------------------------------------------------- JumpReLU
@dataclass(frozen=True)
class JumpReLUTranscoderConfig(TranscoderConfigMixin, JumpReLUConfig):
    architecture: ClassVar[str] = "jumprelu_transcoder"
    plain_architecture: ClassVar[str] = "jumprelu"


@register_sae
class JumpReLUTranscoder(TranscoderMixin, JumpReLUSAE):
    config_class: ClassVar[type[SAEConfig]] = JumpReLUTranscoderConfig


@dataclass(frozen=True)
class JumpReLUSkipTranscoderConfig(JumpReLUTranscoderConfig):
    architecture: ClassVar[str] = "jumprelu_skip_transcoder"
    plain_architecture: ClassVar[str | None] = None
    skip_connection: ClassVar[bool] = True


@register_sae
class JumpReLUSkipTranscoder(JumpReLUTranscoder):
    config_class: ClassVar[type[SAEConfig]] = JumpReLUSkipTranscoderConfig
