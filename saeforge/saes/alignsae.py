"""AlignSAE: an SAE whose last latents are supervised to named concepts, next to free latents (Lai et al., "AlignSAE:
Concept-Aligned Sparse Autoencoders", arXiv 2512.02004; docs/steering.md, "AlignSAE").

    z = act(W_enc x + b_enc)        act: ReLU (default) or the identity (the paper's code)
    z = [z_free | z_concept]        the last len(concepts) latents form the concept block
    x_hat = W_dec z + b_dec

Training follows the paper's "pre-train, then post-train" curriculum inside one run: for the first
``pretrain_fraction`` of the steps (the paper: 50 of 150 epochs) the loss is reconstruction only, then

    L = λ_recon·MSE(x_hat, x) + λ_sparse·mean|z_free| + λ_align·MSE(z_concept, y)
        + λ_indep·‖offdiag Cov(z_free)‖²_F + λ_ortho·‖CrossCov(z_concept, z_free)‖²_F

with the paper's defaults (1, 1e-3, 1, 1e-2, 1e-2) and ``y`` the per-token concept labels (multi-hot, [N, C]; a
token of no concept has all zeros, so the concept latents learn to stay silent there). The paper's MSEs are means
over elements; saeforge's "mse" term is the squared error summed over features (comparable across architectures),
so every term here is the paper's times d_out: the same loss up to one positive constant, the same balance.

The labels reach the SAE through ``TrainState.labels``: the trainer reads them from the activation cache's
``label_site`` (default ``concepts``, an [N, C] array stored beside the activations, e.g. with
``ActivationCache.from_arrays(out, {site: acts, "concepts": labels})``).

On the tokens labelled with a concept, the alignment term reads the concept latent's pre-activation (the same
value wherever the latent fires): with ReLU latents and the plain MSE(z_concept, y), a concept latent that is off on
its own concept's tokens gets no gradient there, while the ~95 % of tokens without the concept keep pushing it down,
so it can die for good (on the embedded model, 4 of 5 concept latents did within 1,500 steps; docs/steering.md).

Differences from the paper's code, and why: ReLU by default, because a linear code is not sparse and its
"latents" cannot be clamped to zero meaningfully (``activation="linear"`` gives the code's form); the value heads
(a cross-entropy on the answer's first token from each concept latent) are left out, since token-level concept
labels have no single answer token; the decoder is not kept at unit norm (as in the paper), because a concept
latent is trained to read 1 where its concept is present, so its decoder row carries the concept's magnitude.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from saeforge.errors import SaeforgeError
from saeforge.saes.base import SAE, SAEConfig, TrainOutput, TrainState, _flatten, _is_number, _require
from saeforge.saes.config import option_fix
from saeforge.saes.registry import register_sae

__all__ = ["ALIGN_ACTIVATIONS", "AlignSAE", "AlignSAEConfig", "alignment_terms", "offdiag_cov_sq", "cross_cov_sq"]

ALIGN_ACTIVATIONS = ("relu", "linear")
DEFAULT_LABEL_SITE = "concepts"


@dataclass(frozen=True)
class AlignSAEConfig(SAEConfig):
    architecture: ClassVar[str] = "alignsae"
    sparsity_coefficient_field: ClassVar[str | None] = "sparse_coefficient"
    default_learning_rate: ClassVar[float] = 1e-3  # the paper's AdamW learning rate

    _: KW_ONLY
    # Concept names, one supervised latent each: the last len(concepts) latents. Empty: no concept block (the
    # paper's SAE without supervision).
    concepts: tuple[str, ...] = ()
    # The activation-cache site holding the per-token labels [N, len(concepts)] (0/1, multi-hot).
    label_site: str = DEFAULT_LABEL_SITE
    activation: str = "relu"
    recon_coefficient: float = 1.0
    sparse_coefficient: float | None = None  # None -> 1e-3 (the paper's λ_sparse)
    align_coefficient: float = 1.0
    indep_coefficient: float = 1e-2
    ortho_coefficient: float = 1e-2
    # Fraction of the run trained on reconstruction alone before the alignment terms start (the paper: 50 of 150).
    pretrain_fraction: float = 1 / 3

    @classmethod
    def label_site_for(cls, options: dict[str, Any]) -> str | None:
        return (options.get("label_site") or DEFAULT_LABEL_SITE) if options.get("concepts") else None

    def _default_apply_b_dec_to_input(self) -> bool:
        return False  # the paper's encoder reads the activation as is

    def _default_b_dec_init(self) -> str:
        return "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        a = self.architecture
        if isinstance(self.concepts, str):
            self._set("concepts", (self.concepts,))
        names = tuple(self.concepts)
        _require(all(isinstance(n, str) and n.strip() for n in names),
                 f"{a}: concept names must be non-empty strings, got {list(names)!r}",
                 option_fix(self, "concepts", ["royalty", "number"]))
        _require(len(set(names)) == len(names), f"{a}: concept names repeat: {list(names)!r}",
                 option_fix(self, "concepts", sorted(set(names)), "(each concept once)"))
        _require(len(names) < self.d_sae,
                 f"{a}: the concept block ({len(names)} latents) is as wide as d_sae={self.d_sae} or wider, which "
                 "leaves no free latent", option_fix(self, "d_sae", max(8 * len(names), len(names) + 1)))
        _require(self.activation in ALIGN_ACTIVATIONS, f"{a}: unknown activation {self.activation!r}",
                 option_fix(self, "activation", "relu", f"(one of {', '.join(ALIGN_ACTIVATIONS)})"))
        _require(isinstance(self.label_site, str) and bool(self.label_site),
                 f"{a}: label_site must be a site name, got {self.label_site!r}",
                 option_fix(self, "label_site", DEFAULT_LABEL_SITE))
        if self.sparse_coefficient is None:
            self._set("sparse_coefficient", 1e-3)
        for name in ("recon_coefficient", "sparse_coefficient", "align_coefficient", "indep_coefficient",
                     "ortho_coefficient"):
            v = getattr(self, name)
            _require(_is_number(v) and v >= 0, f"{a}: {name} must be a non-negative number, got {v!r}",
                     option_fix(self, name, 1.0 if name in ("recon_coefficient", "align_coefficient") else 0.01))
        _require(_is_number(self.pretrain_fraction) and 0 <= self.pretrain_fraction < 1,
                 f"{a}: pretrain_fraction must lie in [0, 1), got {self.pretrain_fraction!r}",
                 option_fix(self, "pretrain_fraction", 0.33))

    @property
    def n_concepts(self) -> int:
        return len(self.concepts)

    @property
    def n_free(self) -> int:
        return self.d_sae - self.n_concepts


def offdiag_cov_sq(z: Tensor) -> Tensor:
    """‖offdiag Cov(z)‖²_F for z [N, F] (covariance over the batch, divided by N as the paper does).

    ‖C‖²_F = ‖Zc Zcᵀ‖²_F / N² (the Gram form, trace((ZᵀZ)²) = trace((ZZᵀ)²)), whichever of the two products is
    smaller, so a wide free block costs N²F, not F²N, when the batch is smaller than it."""
    n, f = z.shape
    zc = z - z.mean(0, keepdim=True)
    gram = zc @ zc.T if n < f else zc.T @ zc
    total = gram.pow(2).sum() / n**2
    diag = (zc.pow(2).sum(0) / n).pow(2).sum()
    return (total - diag).clamp_min(0)


def cross_cov_sq(a: Tensor, b: Tensor) -> Tensor:
    """‖Cov(a, b)‖²_F for a [N, C], b [N, F] (cross-covariance over the batch, divided by N)."""
    n = a.shape[0]
    return ((a - a.mean(0, keepdim=True)).T @ (b - b.mean(0, keepdim=True)) / n).pow(2).sum()


def alignment_terms(z: Tensor, labels: Tensor, n_concepts: int, cfg: AlignSAEConfig, width: int,
                    sparsity_scale: float = 1.0, pre: Tensor | None = None) -> dict[str, Tensor]:
    """The post-training terms (weighted, times ``width`` = d_out; see the module docstring) for latents z [N, d_sae]
    whose last ``n_concepts`` columns are the concept block.

    ``pre``: the pre-activations [N, d_sae]. Given, the alignment term reads a concept latent's pre-activation on
    the tokens labelled with its concept (its value is the same wherever the latent fires), so a ReLU latent that
    is off on its own concept still gets the gradient that turns it on; elsewhere it reads the activation, which
    only asks the latent to stay off."""
    z_free, z_con = z[:, :z.shape[1] - n_concepts], z[:, z.shape[1] - n_concepts:]
    terms = {"sparse": cfg.sparse_coefficient * float(sparsity_scale) * width * z_free.abs().mean(),
             "indep": cfg.indep_coefficient * width * offdiag_cov_sq(z_free) if cfg.indep_coefficient else
             z.new_zeros(())}
    if n_concepts:
        read = z_con if pre is None else torch.where(labels > 0, pre[:, pre.shape[1] - n_concepts:], z_con)
        terms["align"] = cfg.align_coefficient * width * (read - labels).pow(2).mean()
        terms["ortho"] = cfg.ortho_coefficient * width * cross_cov_sq(z_con, z_free)
    return terms


@register_sae
class AlignSAE(SAE):
    config_class: ClassVar[type[SAEConfig]] = AlignSAEConfig
    cfg: AlignSAEConfig

    @property
    def unit_norm_decoder(self) -> bool:
        return False

    # ---- concepts ----
    @property
    def concept_slice(self) -> slice:
        return slice(self.cfg.n_free, self.cfg.d_sae)

    def concept_index(self, name: str) -> int:
        """The latent supervised to concept ``name``."""
        if name not in self.cfg.concepts:
            known = ", ".join(self.cfg.concepts) or "none (this AlignSAE was trained without concepts)"
            raise SaeforgeError(f"unknown concept {name!r}; this AlignSAE knows: {known}",
                                f"use one of its concepts, e.g. sae.concept_index({self.cfg.concepts[0]!r})"
                                if self.cfg.concepts else "train an AlignSAE with --sae-options "
                                "'{\"concepts\": [\"royalty\", \"number\"]}'")
        return self.cfg.n_free + self.cfg.concepts.index(name)

    def check_labels(self, labels: Tensor | None, n_rows: int) -> Tensor:
        """The labels of a batch of ``n_rows`` activations, checked: [n_rows, n_concepts], finite, in [0, 1]."""
        c = self.cfg.n_concepts
        if labels is None:
            raise SaeforgeError(f"this AlignSAE has {c} concept(s) ({', '.join(self.cfg.concepts)}) but the batch "
                                "came without concept labels",
                                f"train from an activation cache that holds the labels as the site "
                                f"{self.cfg.label_site!r} ([tokens, {c}]), e.g. "
                                f"ActivationCache.from_arrays(out, {{site: acts, {self.cfg.label_site!r}: labels}})")
        if labels.dim() != 2 or labels.shape != (n_rows, c):
            raise SaeforgeError(f"the concept labels are {list(labels.shape)} but the activations need "
                                f"[{n_rows}, {c}] (one row per token, one column per concept: "
                                f"{', '.join(self.cfg.concepts)})",
                                "write one label row per activation row, with the concepts in the order of "
                                "--sae-options '{\"concepts\": [...]}'")
        labels = labels.to(self.device, self.dtype)
        if not bool(torch.isfinite(labels).all()) or bool((labels < 0).any()) or bool((labels > 1).any()):
            raise SaeforgeError("concept labels must be 0/1 (or probabilities in [0, 1])",
                                "write 1 where a token shows the concept, 0 elsewhere")
        return labels

    # ---- forward ----
    def _pre(self, x: Tensor) -> Tensor:
        return self._encoder_input(x) @ self.W_enc + self.b_enc

    def _act(self, pre: Tensor) -> Tensor:
        return torch.relu(pre) if self.cfg.activation == "relu" else pre

    def encode(self, x: Tensor) -> Tensor:
        x2, lead = _flatten(x, self.cfg.d_in, "the input")
        return self._act(self._pre(x2)).reshape(*lead, self.cfg.d_sae)

    def aligned(self, state: TrainState) -> bool:
        """Whether the alignment terms are on at this step (after the reconstruction-only pre-training)."""
        if state.total_steps is None:
            return True
        return state.step >= int(self.cfg.pretrain_fraction * state.total_steps)

    def training_loss(self, x: Tensor, target: Tensor | None = None, *, state: TrainState) -> TrainOutput:
        x, target = self._check_batch(x, target)
        labels = self.check_labels(state.labels, x.shape[0]) if self.cfg.n_concepts else x.new_zeros(x.shape[0], 0)
        pre = self._pre(x)
        z = self._act(pre)
        x_hat = z @ self.W_dec + self.b_dec
        terms = {"mse": self.cfg.recon_coefficient * self._squared_error(x_hat, target)}
        if self.aligned(state):
            terms.update(alignment_terms(z, labels, self.cfg.n_concepts, self.cfg, self.cfg.d_output,
                                         state.sparsity_scale, pre=pre))
        else:  # pre-training: reconstruction only (the same term names, so the logged metrics line up)
            names = ("sparse", "indep") + (("align", "ortho") if self.cfg.n_concepts else ())
            terms.update({k: z.new_zeros(()) for k in names})
        fired, l0 = self._sparsity_stats(z != 0)
        return TrainOutput(loss=sum(terms.values()), terms=terms, x_hat=x_hat, fired=fired, l0=l0)

    @torch.no_grad()
    def binding_accuracy(self, x: Tensor, labels: Tensor) -> dict[str, float]:
        """Per concept, on the tokens labelled with it alone: how often its latent is the largest of the concept
        block (the paper's binding accuracy, the diagonal of the concept × slot argmax confusion matrix)."""
        labels = self.check_labels(labels, x.shape[0])
        z = self.encode(x)[:, self.concept_slice]
        only = labels.sum(1) == 1
        out = {}
        for j, name in enumerate(self.cfg.concepts):
            rows = only & (labels[:, j] > 0.5)
            out[name] = float((z[rows].argmax(1) == j).float().mean()) if bool(rows.any()) else float("nan")
        return out

    def saelens_architecture(self) -> str:
        return "standard"

    def export_warnings(self) -> list[str]:
        if self.cfg.activation == "linear":
            return ["alignsae: a linear (activation='linear') AlignSAE has no SAELens architecture; SAELens will read "
                    "it as a ReLU SAE (saeforge loads it exactly)"]
        return []
