"""Crosscoders: one dictionary over several sites at once (Lindsey, Templeton, Marcus, Conerly, Batson and Olah,
"Sparse Crosscoders for Cross-Layer Features and Model Diffing", transformer-circuits.pub 2024).

An acausal crosscoder reads n sites (several layers of one model, or the same layer of two models for model
diffing) and reconstructs all of them from one set of latents:

    f   = code(Σ_s x_s W_enc[s] + b_enc) = code([x_1 … x_n] W_enc + b_enc)
    x̂_s = f W_dec[:, s] + b_dec[s]
    L   = Σ_s ||x_s − x̂_s||² + the code's own terms

which is the architecture of the same name (``topk``, ``batchtopk``, ``jumprelu``) on the concatenation of the sites,
with each latent's decoder over all sites kept at unit norm: the split of that norm between sites is learnt, and
that split is what model diffing reads (a latent whose decoder lives on one model only is exclusive to it;
:mod:`saeforge.diffing`). The trainer normalises every site on its own (their scales differ by layer and by model)
and folds the scales so that the saved crosscoder takes raw activations: the latents keep their training units, and
:meth:`CrosscoderMixin.decoder_norms` takes ``scales`` to give the decoder norms in the normalised space.

Registered as ``topk_crosscoder``, ``batchtopk_crosscoder`` and ``jumprelu_crosscoder``; ``n_sites`` is set by the
trainer (one per site read). Saved in saeforge's folder, which is also a SAELens folder of the plain architecture over
the concatenated sites.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from saeforge.errors import SaeforgeError
from saeforge.saes.base import SAEConfig, _is_int, _require
from saeforge.saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from saeforge.saes.jumprelu import JumpReLUConfig, JumpReLUSAE
from saeforge.saes.normalization import site_scales
from saeforge.saes.registry import register_sae
from saeforge.saes.topk import TopKConfig, TopKSAE

__all__ = ["BatchTopKCrosscoder", "BatchTopKCrosscoderConfig", "CrosscoderMixin", "JumpReLUCrosscoder",
           "JumpReLUCrosscoderConfig", "TopKCrosscoder", "TopKCrosscoderConfig"]


class CrosscoderConfigMixin:
    # a crosscoder over one site is an SAE
    binding_kinds: ClassVar[tuple[str, ...]] = ("crosscoder", "sae")

    @classmethod
    def binding_options(cls, read_widths: tuple[int, ...], write_widths: tuple[int, ...]) -> dict[str, Any]:
        if len(set(read_widths)) > 1:
            raise SaeforgeError(f"a crosscoder needs sites of one width, got {list(read_widths)}",
                                "use the same site kind at every layer, and models of one width")
        return {"n_sites": max(1, len(read_widths))}

    def __post_init__(self) -> None:
        a, n = self.architecture, self.n_sites
        _require(_is_int(n) and n > 0, f"{a}: n_sites must be a positive integer, got {n!r}",
                 "let the trainer set it (one per site read)")
        for name in ("d_in", "d_out"):
            v = getattr(self, name)
            _require(v is None or (_is_int(v) and v > 0 and v % n == 0),
                     f"{a}: {name}={v!r} is not a multiple of n_sites={n}", "let the trainer set the widths")
        super().__post_init__()

    @property
    def d_site_in(self) -> int:
        return self.d_in // self.n_sites

    @property
    def d_site_out(self) -> int:
        return self.d_output // self.n_sites


@dataclass(frozen=True)
class TopKCrosscoderConfig(CrosscoderConfigMixin, TopKConfig):
    architecture: ClassVar[str] = "topk_crosscoder"
    _: KW_ONLY
    # Sites the crosscoder reads (and writes), concatenated in the binding's order; the trainer sets it.
    n_sites: int = 1


@dataclass(frozen=True)
class BatchTopKCrosscoderConfig(CrosscoderConfigMixin, BatchTopKConfig):
    architecture: ClassVar[str] = "batchtopk_crosscoder"
    _: KW_ONLY
    n_sites: int = 1


@dataclass(frozen=True)
class JumpReLUCrosscoderConfig(CrosscoderConfigMixin, JumpReLUConfig):
    architecture: ClassVar[str] = "jumprelu_crosscoder"
    _: KW_ONLY
    n_sites: int = 1


class CrosscoderMixin:
    """Per-site scales and decoder norms on top of an SAE architecture."""

    cfg: Any

    @torch.no_grad()
    def fold_input_scale(self, scale_in: float | Sequence[float], scale_out: float | Sequence[float] | None = None
                         ) -> None:
        """Fold one scale per site (or one for all): the latents keep their training units; the encoder rows of
        site s are multiplied by its input scale, the decoder columns and ``b_dec`` of site s divided by its output
        scale. With ``apply_b_dec_to_input`` (b_dec is then on both sides) the two scales of a site must agree."""
        n = self.cfg.n_sites
        s_in = site_scales(scale_in, n, "input")
        s_out = site_scales(scale_in if scale_out is None else scale_out, n, "output")
        _require(not self.cfg.apply_b_dec_to_input or s_in == s_out,
                 "with apply_b_dec_to_input the input and output scale of each site must agree (b_dec is both)",
                 "pass one scale per site")
        di, do = self.cfg.d_site_in, self.cfg.d_site_out
        for s in range(n):
            self.W_enc[s * di:(s + 1) * di].mul_(s_in[s])
            self.W_dec[:, s * do:(s + 1) * do].div_(s_out[s])
            self.b_dec[s * do:(s + 1) * do].div_(s_out[s])

    @torch.no_grad()
    def decoder_norms(self, scales: Sequence[float] | None = None) -> Tensor:
        """[d_sae, n_sites]: the norm of each latent's decoder on each site; with the sites' output ``scales`` (as
        the trainer folded them), in the normalised space the crosscoder was trained in."""
        n, do = self.cfg.n_sites, self.cfg.d_site_out
        norms = self.W_dec.detach().float().reshape(self.cfg.d_sae, n, do).norm(dim=2)
        if scales is not None:
            norms = norms * torch.tensor(site_scales(scales, n, "output"), dtype=norms.dtype, device=norms.device)
        return norms


@register_sae
class TopKCrosscoder(CrosscoderMixin, TopKSAE):
    config_class: ClassVar[type[SAEConfig]] = TopKCrosscoderConfig


@register_sae
class BatchTopKCrosscoder(CrosscoderMixin, BatchTopKSAE):
    config_class: ClassVar[type[SAEConfig]] = BatchTopKCrosscoderConfig


@register_sae
class JumpReLUCrosscoder(CrosscoderMixin, JumpReLUSAE):
    config_class: ClassVar[type[SAEConfig]] = JumpReLUCrosscoderConfig
