"""BatchTopK SAE (Bussmann, Leask, Nanda 2024, arXiv 2412.06410).

Training: the N·k largest of ReLU(W_enc (x - b_dec) + b_enc) over the whole batch of N tokens are kept, so the
per-token L0 varies while its batch mean is exactly k (when at least N·k pre-activations are positive). Loss as
TopK (squared error + AuxK).

Inference: one global threshold θ replaces the batch selection, i.e. a JumpReLU ``f = pre · 1[pre > θ]`` with
``pre = ReLU(...)``. θ is learned during training as an exponential moving average of the smallest positive
selected activation of each batch (dictionary_learning: β = 0.999, from step 1000, or from the middle of a
shorter run; the first update sets θ directly). θ lives in the buffer ``threshold`` (so ``state_dict()`` carries it;
-1 = not learned yet). Until θ is learned, ``encode`` falls back to the batch selection over the batch it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from saeforge.distributed.batch import global_min, keep_global_batch_top, sharded_world_size
from saeforge.errors import SaeforgeError
from saeforge.kernels import SparseLatents
from saeforge.saes.base import SAEConfig, TrainState, _flatten, _is_int, _is_number, _require, option_fix
from saeforge.saes.registry import register_sae
from saeforge.saes.topk import TopKConfig, TopKSAE

__all__ = ["BatchTopKConfig", "BatchTopKSAE", "update_threshold"]


@dataclass(frozen=True)
class BatchTopKConfig(TopKConfig):
    architecture: ClassVar[str] = "batchtopk"

    # EMA decay of the inference threshold, and the step from which it is updated (early batches come from a
    # badly-trained encoder and would only pollute the average).
    threshold_beta: float = 0.999
    threshold_start_step: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        a = self.architecture
        _require(_is_number(self.threshold_beta) and 0 <= self.threshold_beta < 1,
                 f"{a}: threshold_beta must be in [0, 1), got {self.threshold_beta!r}",
                 option_fix(self, "threshold_beta", 0.999, "(the default)"))
        _require(_is_int(self.threshold_start_step) and self.threshold_start_step >= 0,
                 f"{a}: threshold_start_step must be a non-negative integer, got {self.threshold_start_step!r}",
                 option_fix(self, "threshold_start_step", 1000, "(the default)"))


@torch.no_grad()
def update_threshold(threshold: Tensor, values: Tensor, state: TrainState, cfg: BatchTopKConfig) -> None:
    """One step of the inference threshold's EMA, in place on ``threshold`` (a 0-d float32 tensor or view; -1 = not
    learnt yet): the smallest positive selected activation among ``values``, from ``threshold_start_step``, or from
    the middle of a run shorter than twice that (so no saved dictionary lacks a threshold); the first update sets it
    directly. BatchTopK SAEs, transcoders and crosscoders, and each layer of a BatchTopK CLT, learn theirs here."""
    start = cfg.threshold_start_step
    if state.total_steps is not None:
        start = min(start, state.total_steps // 2)
    if state.step < start:
        return
    positive = values.detach()
    positive = positive[positive > 0]
    # the smallest selected activation of the whole batch, over the ranks when data-parallel ranks share it
    smallest = global_min((positive.min() if positive.numel() else positive.new_tensor(float("inf"))).float())
    if not bool(torch.isfinite(smallest)):
        return
    if bool(threshold >= 0):
        beta = cfg.threshold_beta
        threshold.mul_(beta).add_((1 - beta) * smallest)
    else:
        threshold.copy_(smallest)


@register_sae
class BatchTopKSAE(TopKSAE):
    config_class: ClassVar[type[SAEConfig]] = BatchTopKConfig
    cfg: BatchTopKConfig
    batch_selection: ClassVar[bool] = True

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        # float32 whatever the parameter dtype: an EMA with β = 0.999 would stall in bfloat16.
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32))

    @property
    def threshold_learned(self) -> bool:
        return bool(self.threshold >= 0)

    # ---- inference ----
    def encode(self, x: Tensor) -> Tensor:
        if not self.threshold_learned:
            return super().encode(x)  # batch selection over this batch; see the module docstring
        x2, lead = _flatten(x, self.cfg.d_in, "the input")
        pre = torch.relu(self._encoder_input(x2) @ self.W_enc + self.b_enc)
        f = pre * (pre > self.threshold.to(pre.dtype))
        return f.reshape(*lead, self.cfg.d_sae)

    # ---- training ----
    def _encode_sparse(self, x: Tensor, *, dead_mask: Tensor | None = None, matmul_dtype: torch.dtype | None = None,
                       k: int | None = None) -> tuple[SparseLatents, SparseLatents | None]:
        world = sharded_world_size()
        if world == 1:
            return super()._encode_sparse(x, dead_mask=dead_mask, matmul_dtype=matmul_dtype, k=k)
        # Data-parallel: this rank holds N/W of the N rows. Its own N·k largest contain every one of its global
        # winners; the global N·k are chosen among all ranks' (docs/distributed.md).
        lat, aux = super()._encode_sparse(x, dead_mask=dead_mask, matmul_dtype=matmul_dtype,
                                          k=min(self.cfg.k * world, self.cfg.d_sae))
        return keep_global_batch_top(lat, x.shape[0] * world * self.cfg.k), aux

    @torch.no_grad()
    def _after_training_forward(self, lat: SparseLatents, state: TrainState) -> None:
        update_threshold(self.threshold, lat.values, state, self.cfg)

    # ---- folding ----
    @torch.no_grad()
    def _scale_latents(self, factor: Tensor) -> None:
        if float(factor.max() - factor.min()) > 1e-12 * float(factor.abs().max()):
            raise SaeforgeError(f"{self.architecture}: the global threshold cannot follow a per-latent rescaling",
                                "only uniform rescaling (fold_input_scale) is supported for this architecture")
        super()._scale_latents(factor)
        if self.threshold_learned:
            self.threshold.mul_(float(factor[0]))

    # ---- saving ----
    def saelens_architecture(self) -> str:
        return "jumprelu_transcoder" if self.cfg.is_transcoder else "jumprelu"

    def saelens_config_extras(self) -> dict:
        return {}

    def export_warnings(self) -> list[str]:
        if self.threshold_learned:
            return []
        return [f"{self.architecture}: the inference threshold has not been learned yet; SAELens will see "
                "threshold 0 (a plain ReLU). saeforge's own loader restores the batch selection."]

    def saelens_tensors(self) -> dict[str, Tensor]:
        out = super().saelens_tensors()
        theta = float(self.threshold.clamp_min(0))
        out["threshold"] = torch.full((self.cfg.d_sae,), theta, dtype=self.dtype, device=self.device)
        return out
