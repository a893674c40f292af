"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, arXiv 2406.04093; docs/methods.md).

    z = TopK_k(ReLU(W_enc (x - b_dec) + b_enc)),   x_hat = W_dec z + b_dec
    L = ||x - x_hat||^2 + auxk

The training forward runs through the sparse kernels in :mod:`saeforge.kernels` (``encode_topk`` /
``decode_sparse``, ``kernel="fast"`` or ``"reference"``); ``encode`` (inference, dense output) is plain PyTorch
selecting the same entries. Decoder rows are kept at unit norm (gradient
projection + renormalisation every step, as in the OpenAI code): TopK selection is not invariant to rescaling a
latent, so the unit norm is what makes the latents comparable.

AuxK (OpenAI ``train.py``): with e = x - x_hat (stop-gradient) and ê = W_dec z_aux (no bias), where z_aux keeps
each row's top ``aux_k`` pre-activations among *dead* latents, OpenAI adds α·NMSE(ê, e) to a main loss that is
itself normalised by the data variance. saeforge keeps the main term in raw squared-error units (comparable
across architectures), so the aux term is OpenAI's multiplied by the same per-batch data variance:

    auxk = α · ||ê - e||² / ||e - mean_batch(e)||² · mean_batch ||x - mean_batch(x)||²     (sums over the batch)

which is OpenAI's loss times a positive per-batch constant, i.e. the same balance between the two terms. It is 0
when no latent is dead (OpenAI: NaN -> 0). Dead = not fired for ``dead_after_tokens`` tokens; the trainer tracks
that and passes ``TrainState.dead_mask``.
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from saeforge.distributed.batch import auxk_normalisers
from saeforge.errors import SaeforgeError
from saeforge.kernels import SparseLatents, decode_sparse, encode_topk, native
from saeforge.kernels.buffers import StepBuffers
from saeforge.saes.base import (
    DTYPES,
    SAE,
    SAEConfig,
    TrainOutput,
    TrainState,
    _flatten,
    _is_int,
    _is_number,
    _require,
    option_fix,
)
from saeforge.saes.registry import register_sae

__all__ = ["KERNEL_IMPLS", "TopKConfig", "TopKSAE"]

KERNEL_IMPLS = ("fast", "reference")


@dataclass(frozen=True)
class TopKConfig(SAEConfig):
    architecture: ClassVar[str] = "topk"
    uses_k: ClassVar[bool] = True
    # Adam at lr_coefficient / sqrt(d_sae / 2^14): Gao et al.'s 1/sqrt(d_sae) scaling (arXiv 2406.04093, Fig. 3)
    # with a coefficient 5x their 2e-4, which is far too small with saeforge's input scaling (E||x|| = sqrt(d)) at
    # the run lengths people use; larger ones leave more latents silent on held-out text. Measurements:
    # docs/architecture.md, "Learning rate". BatchTopK and Matryoshka inherit it.
    lr_coefficient: ClassVar[float] = 1e-3
    # Under 128 steps the rate is raised by sqrt(128 / steps): at 32 steps of 4,096 tokens (layer 6 of the embedded
    # model) 2x the rate took held-out FVU from 0.179 to 0.157 (2.8x: 0.159), ahead of sparsify's 0.167.
    short_run_steps: ClassVar[int] = 128

    @classmethod
    def default_lr(cls, d_sae: int) -> float:
        return cls.lr_coefficient / math.sqrt(d_sae / 2**14)

    _: KW_ONLY
    k: int
    # Latents per token in the AuxK reconstruction. None -> d_out // 2 (dictionary_learning / sparsify; the paper
    # says "a power of two close to d_model / 2"), capped at d_sae.
    aux_k: int | None = None
    auxk_coefficient: float = 1 / 32
    # The trainer marks a latent dead after this many tokens without firing (OpenAI: 10M).
    dead_after_tokens: int = 10_000_000
    kernel: str = "fast"
    # None: the encoder GEMM runs in the parameter dtype; "bfloat16": in bfloat16 (values/grads come back in
    # the parameter dtype).
    matmul_dtype: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        a = self.architecture
        _require(_is_int(self.k) and self.k > 0, f"{a}: k must be a positive integer, got {self.k!r}",
                 option_fix(self, "k", 32, "(active latents per token)"))
        _require(self.k <= self.d_sae, f"{a}: k={self.k} is larger than d_sae={self.d_sae}",
                 option_fix(self, "k", min(32, self.d_sae),
                            "or a larger --d-sae (k is typically a few dozen, d_sae thousands)"))
        if self.aux_k is None:
            self._set("aux_k", max(1, min(self.d_output // 2, self.d_sae)))
        _require(_is_int(self.aux_k) and 0 <= self.aux_k <= self.d_sae,
                 f"{a}: aux_k must be an integer in [0, d_sae={self.d_sae}], got {self.aux_k!r}",
                 option_fix(self, "aux_k", max(0, min(256, self.d_sae)), "(0 turns AuxK off; left out: d_out // 2)"))
        _require(_is_number(self.auxk_coefficient) and self.auxk_coefficient >= 0,
                 f"{a}: auxk_coefficient must be a non-negative number, got {self.auxk_coefficient!r}",
                 option_fix(self, "auxk_coefficient", 0.03125, "(OpenAI's 1/32)"))
        _require(_is_int(self.dead_after_tokens) and self.dead_after_tokens > 0,
                 f"{a}: dead_after_tokens must be a positive integer, got {self.dead_after_tokens!r}",
                 option_fix(self, "dead_after_tokens", 10_000_000, "(OpenAI's definition)"))
        _require(self.kernel in KERNEL_IMPLS, f"{a}: unknown kernel {self.kernel!r}",
                 option_fix(self, "kernel", "fast", f"(one of {', '.join(KERNEL_IMPLS)})"))
        _require(self.matmul_dtype is None or self.matmul_dtype in DTYPES,
                 f"{a}: unknown matmul_dtype {self.matmul_dtype!r}",
                 option_fix(self, "matmul_dtype", "bfloat16", "(or leave it out: the parameter dtype)"))


def _dense_topk(pre: Tensor, k: int, *, batch: bool) -> Tensor:
    if batch:
        flat = pre.reshape(-1)
        top = flat.topk(min(pre.shape[0] * k, flat.numel()), sorted=False)
        return torch.zeros_like(flat).scatter(0, top.indices, torch.relu(top.values)).view_as(pre)
    top = pre.topk(k, dim=1, sorted=False)
    return torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))


def _fired_and_l0(lat: SparseLatents) -> tuple[Tensor, float]:
    positive = (lat.values.detach() > 0).float()
    # a count per latent (index_add_): ~0.2 ms at the benchmark shape, where a boolean-mask scatter took ~1.5 ms
    fired = torch.zeros(lat.shape[1], device=lat.values.device).index_add_(0, lat.cols, positive) > 0
    return fired, float(positive.sum()) / lat.shape[0]


def auxk_loss(e_hat: Tensor, e: Tensor, target: Tensor, coefficient: float) -> Tensor:
    """AuxK: the dead latents' reconstruction ``e_hat`` of the residual ``e``, as a normalised MSE scaled by the
    data's variance; the normalisers are over the global batch when ranks share it (saeforge.distributed.batch),
    this batch's in one process."""
    denom, data_var, share = auxk_normalisers(e, target)
    if not bool(denom > 0):
        return e.new_zeros(())
    term = coefficient * ((e_hat - e).pow(2).sum() / denom) * data_var
    return torch.nan_to_num(term if share == 1 else term * share, nan=0.0)


class _SquaredErrorFn(torch.autograd.Function):
    """``(x_hat - target).pow(2).sum(-1).mean()`` (``SAE._squared_error``) with the difference, the squares and the
    gradient in buffers reused from step to step: the same ops, so the same bits as autograd's, and the gradient
    ``diff · 2(g/N)``, which is autograd's ``(g/N) · (2 diff)`` rounded once from the same exact product. Fresh [N,
    d_out] tensors for these cost ~3 ms a step in page faults at the benchmark shape (``benchmarks/train_step.py``).
    """

    @staticmethod
    def forward(ctx, x_hat, target, buffers):
        diff = torch.sub(x_hat, target, out=buffers.get(("x_hat - target", *x_hat.shape), x_hat.shape, x_hat.dtype,
                                                        x_hat.device))
        squares = buffers.get(("squares", *x_hat.shape), x_hat.shape, x_hat.dtype, x_hat.device)
        ctx.buffers = buffers
        ctx.save_for_backward(diff)
        return torch.pow(diff, 2, out=squares).sum(-1).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (diff,) = ctx.saved_tensors
        # the squares' buffer is free again (nothing kept it): the gradient goes there
        out = ctx.buffers.get(("squares", *diff.shape), diff.shape, diff.dtype, diff.device)
        grad = torch.mul(diff, g / diff.shape[0] * 2, out=out)
        return grad, (-grad if ctx.needs_input_grad[1] else None), None


@register_sae
class TopKSAE(SAE):
    config_class: ClassVar[type[SAEConfig]] = TopKConfig
    cfg: TopKConfig

    # BatchTopK sets this: select the top N*k over the whole batch instead of k per row.
    batch_selection: ClassVar[bool] = False

    # ---- kernels ----
    @property
    def _step_buffers(self) -> StepBuffers | None:
        """The fast path's buffers reused from step to step (weight gradients, the projection's work tensors; see
        :mod:`saeforge.kernels.buffers`); None for ``kernel="reference"``, which allocates as plain PyTorch does."""
        if self.cfg.kernel != "fast":
            return None
        buffers = self.__dict__.get("_buffers_of_steps")
        if buffers is None:
            buffers = self.__dict__["_buffers_of_steps"] = StepBuffers()
        return buffers

    @property
    def _matmul_dtype(self) -> torch.dtype | None:
        return None if self.cfg.matmul_dtype is None else DTYPES[self.cfg.matmul_dtype]

    def _encode_sparse(self, x: Tensor, *, dead_mask: Tensor | None = None, matmul_dtype: torch.dtype | None = None,
                       k: int | None = None) -> tuple[SparseLatents, SparseLatents | None]:
        """The training selection (``k``: the selection's k when not the config's, for data-parallel BatchTopK's
        candidates) and the AuxK one."""
        aux_k = 0
        if dead_mask is not None and self.cfg.aux_k > 0 and self.cfg.auxk_coefficient > 0:
            dead_mask = dead_mask.to(self.device).bool()
            if dead_mask.shape != (self.cfg.d_sae,):
                raise SaeforgeError(f"dead_mask must be bool [{self.cfg.d_sae}], got {tuple(dead_mask.shape)}",
                                    "pass the mask the dead-latent tracker produced")
            if bool(dead_mask.any()):
                aux_k = self.cfg.aux_k
        # b_pre: the kernel subtracts b_dec itself and gets its gradient from a matrix-vector product, cheaper than
        # autograd through an [N, d_in] subtraction.
        return encode_topk(x, self.W_enc, self.b_enc, k=self.cfg.k if k is None else k, batch=self.batch_selection,
                           aux_k=aux_k, aux_mask=dead_mask if aux_k else None,
                           matmul_dtype=matmul_dtype, impl=self.cfg.kernel,
                           b_pre=self.b_dec if self.cfg.apply_b_dec_to_input else None, buffers=self._step_buffers)

    def _decode_sparse(self, lat: SparseLatents, W_dec: Tensor | None = None) -> Tensor:
        return decode_sparse(lat, self.W_dec if W_dec is None else W_dec, impl=self.cfg.kernel,
                             buffers=self._step_buffers)

    # ---- inference ----
    def encode(self, x: Tensor) -> Tensor:
        """Dense latents. Plain PyTorch (the output is dense anyway, and it runs under ``torch.inference_mode``);
        it keeps the same entries as the training kernel: the k largest pre-activations per token (all N*k over
        the batch for the batch selection), ReLU'd."""
        x2, lead = _flatten(x, self.cfg.d_in, "the input")
        pre = self._encoder_input(x2) @ self.W_enc + self.b_enc
        return _dense_topk(pre, self.cfg.k, batch=self.batch_selection).reshape(*lead, self.cfg.d_sae)

    # ---- training ----
    def _auxk_term(self, aux: SparseLatents | None, target: Tensor, x_hat: Tensor) -> Tensor:
        zero = x_hat.new_zeros(())
        if aux is None:
            return zero
        return auxk_loss(self._decode_sparse(aux), (target - x_hat).detach(), target, self.cfg.auxk_coefficient)

    def training_loss(self, x: Tensor, target: Tensor | None = None, *, state: TrainState) -> TrainOutput:
        x, target = self._check_batch(x, target)
        lat, aux = self._encode_sparse(x, dead_mask=state.dead_mask,
                                       matmul_dtype=self._matmul_dtype)
        buffers = self._step_buffers
        if buffers is None or x.device.type != "cpu":
            x_hat = self._decode_sparse(lat) + self.b_dec
            mse = self._squared_error(x_hat, target)
        else:  # the same bits with fewer fresh [N, d_out] tensors: the bias added in place, the loss's in buffers
            x_hat = self._decode_sparse(lat).add_(self.b_dec)
            mse = _SquaredErrorFn.apply(x_hat, target, buffers)
        terms = {"mse": mse, "auxk": self._auxk_term(aux, target, x_hat)}
        fired, l0 = _fired_and_l0(lat)
        self._after_training_forward(lat, state)
        return TrainOutput(loss=sum(terms.values()), terms=terms, x_hat=x_hat, fired=fired, l0=l0)

    def _after_training_forward(self, lat: SparseLatents, state: TrainState) -> None:
        """Hook for training-time statistics (BatchTopK's threshold)."""

    # ---- optimiser hooks ----
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """The decoder gradient's projection off the unit-norm rows (``SAE.before_optimizer_step``). On the fast
        path on CPU: one compiled pass where it is built (``native.project_rows_``, ~0.6 ms a step at the benchmark
        shape of ``benchmarks/train_step.py``), else the base class's ops (the same bits) with their two [d_sae,
        d_out] work tensors in buffers reused from step to step (~1.7 ms; fresh ones ~4 ms, writing cold memory)."""
        buffers, g = self._step_buffers, self.W_dec.grad
        if buffers is None or not self.unit_norm_decoder or g is None or g.device.type != "cpu":
            return super().before_optimizer_step()
        W = self.W_dec
        if native.project_rows_(g, W.detach()):
            return
        w = buffers.get("projection: unit rows", W.shape, W.dtype, W.device)
        torch.div(W, W.norm(dim=1, keepdim=True).clamp_min(1e-12), out=w)
        gw = buffers.get("projection: products", W.shape, W.dtype, W.device)
        torch.mul(g, w, out=gw)
        g -= torch.mul(gw.sum(1, keepdim=True), w, out=gw)

    # ---- folding ----
    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """TopK-family decoders are kept at unit norm, so there is nothing to fold.

        Rescaling one latent changes which latents win the TopK, so a decoder with non-unit rows cannot be folded
        without changing the function; that case is refused instead of silently changing the SAE.
        """
        norms = self.W_dec.norm(dim=1).float()
        tol = max(1e-5, 8 * torch.finfo(self.dtype).eps)
        if float((norms - 1).abs().max()) > tol:
            raise SaeforgeError(
                f"{self.architecture}: decoder rows are not unit norm (max |norm - 1| = "
                f"{float((norms - 1).abs().max()):.3g}), and TopK selection is not invariant to rescaling latents",
                "train with saeforge (it keeps the rows at unit norm), or convert the SAE to a JumpReLU/ReLU form first")

    # ---- saving ----
    def saelens_architecture(self) -> str:
        # SAELens has no TopK transcoder; a TopK transcoder is saved as "topk" with d_out and only saeforge loads it.
        return "topk"

    def saelens_config_extras(self) -> dict[str, Any]:
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}
