"""Downstream metrics: splice an SAE into the model at its site (through ``LanguageModel.edit``, the one
intervention mechanism) and compare next-token losses and distributions with the clean model.

- ``ce_loss_*``: mean next-token cross-entropy over the positions where the SAE is spliced (kept positions, i.e.
  not BOS/special tokens; the last position has no target and is skipped);
- ``ce_recovered`` = (CE_zero − CE_SAE) / (CE_zero − CE_clean) (zero-ablation baseline, SAELens/SAEBench
  ``ce_loss_score``); ``ce_recovered_mean_ablation`` uses the activation replaced by its evaluation-set mean;
- ``delta_lm_loss`` = CE_SAE − CE_clean (Gemma Scope);
- ``kl_div`` = mean over the same positions of KL(p_clean ‖ p_SAE); ``kl_div_zero_ablation`` likewise;
  ``kl_score`` = (KL_zero − KL_SAE) / KL_zero.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from saeforge.errors import SaeforgeError
from saeforge.models.language_model import EditContext


def splice(sae, keep: torch.Tensor, mode: str = "sae", mean: torch.Tensor | None = None) -> Callable:
    """An edit function replacing the activation at kept positions.

    ``mode``: ``sae`` (x → x̂), ``sae_with_error`` (x → x̂ + (x − x̂), bit-identical to x because the sum is formed in
    float64, where the difference of two float32 numbers is exact), ``zero`` or ``mean`` (x → ``mean``).
    Positions outside ``keep`` (BOS, special tokens) are left untouched.
    """

    def edit(x: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        if tuple(keep.shape) != tuple(x.shape[:2]):
            raise SaeforgeError(f"the splice at {ctx.site.name} was built for a batch of shape {tuple(keep.shape)} "
                                f"but the forward pass has {tuple(x.shape[:2])}",
                                "build the splice with the keep mask of the batch it runs on")
        m = keep.to(x.device)
        out = x.clone()
        sel = x[m]
        if mode == "sae":
            new = sae(sel.float()).to(x.dtype)
        elif mode == "sae_with_error":
            x_hat = sae(sel.float()).to(x.dtype)
            new = (x_hat.double() + (sel.double() - x_hat.double())).to(x.dtype)
        elif mode == "zero":
            new = torch.zeros_like(sel)
        elif mode == "mean":
            new = mean.to(x.dtype).expand_as(sel)
        else:
            raise ValueError(mode)
        out[m] = new
        return out

    return edit


class DownstreamStats:
    """Feed the clean logits of a batch first (:meth:`update_clean`), then each modified run (:meth:`update`)."""

    MODES = ("sae", "zero", "mean")

    def __init__(self):
        self.sum_ce = {m: 0.0 for m in ("clean",) + self.MODES}
        self.sum_kl = {m: 0.0 for m in self.MODES}
        self.n = 0
        self._clean_logp = self._pos = self._targets = None

    @torch.no_grad()
    def update_clean(self, input_ids: torch.Tensor, keep: torch.Tensor, logits: torch.Tensor) -> None:
        pos = keep.clone()
        pos[:, -1] = False  # the last position has no next token
        self._pos = pos[:, :-1].to(logits.device)
        self._targets = input_ids[:, 1:].to(logits.device)
        self._clean_logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        self.sum_ce["clean"] += self._nll_sum(self._clean_logp)
        self.n += int(self._pos.sum())

    def _nll_sum(self, logp: torch.Tensor) -> float:
        nll = -logp.gather(-1, self._targets[..., None]).squeeze(-1)
        return float(nll[self._pos].double().sum())

    @torch.no_grad()
    def update(self, mode: str, logits: torch.Tensor) -> None:
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        self.sum_ce[mode] += self._nll_sum(logp)
        kl = (self._clean_logp.exp() * (self._clean_logp - logp)).sum(-1)
        self.sum_kl[mode] += float(kl[self._pos].double().sum())

    def result(self) -> dict:
        n = max(self.n, 1)
        ce = {m: v / n for m, v in self.sum_ce.items()}
        kl = {m: v / n for m, v in self.sum_kl.items()}

        def recovered(base: str) -> float:
            # Meaningful when ablation hurts (gap > 0); reported as defined otherwise, NaN only for a zero gap.
            gap = ce[base] - ce["clean"]
            return (ce[base] - ce["sae"]) / gap if gap != 0 else math.nan

        return {
            "n_loss_positions": self.n,
            "ce_loss_clean": ce["clean"],
            "ce_loss_sae": ce["sae"],
            "ce_loss_zero_ablation": ce["zero"],
            "ce_loss_mean_ablation": ce["mean"],
            "ce_recovered": recovered("zero"),
            "ce_recovered_mean_ablation": recovered("mean"),
            "delta_lm_loss": ce["sae"] - ce["clean"],
            "kl_div": kl["sae"],
            "kl_div_zero_ablation": kl["zero"],
            "kl_div_mean_ablation": kl["mean"],
            "kl_score": (kl["zero"] - kl["sae"]) / kl["zero"] if kl["zero"] != 0 else math.nan,
        }
