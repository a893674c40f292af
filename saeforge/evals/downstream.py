"""Downstream metrics: splice an SAE into the model at its site (through ``LanguageModel.edit``, the one
intervention mechanism) and compare next-token losses and distributions with the clean model.

- ``ce_loss_*``: mean next-token cross-entropy over the positions where the SAE is spliced (kept positions, i.e.
  not BOS/special tokens; the last position has no target and is skipped);
- ``ce_recovered`` = (CE_zero − CE_SAE) / (CE_zero − CE_clean) (zero-ablation baseline, SAELens/SAEBench
  ``ce_loss_score``); ``ce_recovered_mean_ablation`` uses the activation replaced by its evaluation-set mean;
- ``delta_lm_loss`` = CE_SAE − CE_clean (Gemma Scope);
- ``kl_div`` = mean over the same positions of KL(p_clean ‖ p_SAE); ``kl_div_zero_ablation`` likewise;
  ``kl_score`` = (KL_zero − KL_SAE) / KL_zero.

A transcoder (reads site A, writes site B) is measured the same way with B replaced by its output computed from A,
and the baselines replace B.

One batch's clean distributions are a :class:`LogitReference`; every modified forward of the batch is measured
against it (:meth:`LogitReference.measure`) into reused buffers, so a batch costs no [batch, seq, vocab] float32
allocation beyond the model's own logits.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from saeforge.errors import SaeforgeError
from saeforge.models.language_model import EditContext


def replace_at(keep: torch.Tensor, values: torch.Tensor | None) -> Callable:
    """An edit function putting ``values`` in place of the activation at kept positions: ``[n_kept, d]`` (one row
    per kept position, in row-major order), ``[d]`` (the same vector everywhere, e.g. a mean) or None (zeros).
    Positions outside ``keep`` (BOS, special tokens) are left untouched."""

    def edit(x: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        m = _checked_keep(keep, x, ctx)
        out = x.clone()
        if values is None:
            out[m] = torch.zeros((), dtype=x.dtype, device=x.device)
        else:
            out[m] = values.to(x.dtype).expand(int(m.sum()), x.shape[-1])
        return out

    return edit


def _checked_keep(keep: torch.Tensor, x: torch.Tensor, ctx: EditContext) -> torch.Tensor:
    if tuple(keep.shape) != tuple(x.shape[:2]):
        raise SaeforgeError(f"the splice at {ctx.site.name} was built for a batch of shape {tuple(keep.shape)} "
                            f"but the forward pass has {tuple(x.shape[:2])}",
                            "build the splice with the keep mask of the batch it runs on")
    return keep.to(x.device)


def splice(sae, keep: torch.Tensor, mode: str = "sae", mean: torch.Tensor | None = None) -> Callable:
    """An edit function replacing the activation at kept positions by what the SAE makes of it.

    ``mode``: ``sae`` (x → x̂), ``sae_with_error`` (x → x̂ + (x − x̂), bit-identical to x because the sum is formed in
    float64, where the difference of two float32 numbers is exact), ``zero`` or ``mean`` (x → ``mean``).
    Positions outside ``keep`` (BOS, special tokens) are left untouched.
    """
    if mode not in ("sae", "sae_with_error", "zero", "mean"):
        raise ValueError(mode)
    if mode in ("zero", "mean"):
        return replace_at(keep, mean if mode == "mean" else None)

    def edit(x: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        sel = x[_checked_keep(keep, x, ctx)]
        x_hat = sae(sel.float()).to(x.dtype)
        if mode == "sae_with_error":
            x_hat = (x_hat.double() + (sel.double() - x_hat.double())).to(x.dtype)
        return replace_at(keep, x_hat)(x, ctx)

    return edit


class LogitReference:
    """The clean next-token distributions of one batch over the loss positions (kept, not the last), against
    which each modified forward of the batch is measured.

    ``buffers``: a dict the caller keeps across batches; the [batch, seq, vocab] float32 tensors are allocated there
    once and reused (a fresh allocation of that size costs page faults comparable to the arithmetic). The values
    are those of ``log_softmax`` of the sliced logits and the plain formulas, bit for bit."""

    def __init__(self, input_ids: torch.Tensor, keep: torch.Tensor, clean_logits: torch.Tensor,
                 buffers: dict | None = None):
        device = clean_logits.device
        pos = keep.clone()
        pos[:, -1] = False  # the last position has no next token
        self.positions = pos[:, :-1].to(device)
        self.targets = input_ids[:, 1:].to(device)
        self.n = int(self.positions.sum())
        self._buffers = {} if buffers is None else buffers
        b, t, v = clean_logits.shape
        self._shape = (b, t, v)
        with torch.no_grad():
            self.logp = self._buffer("logp", (b, t - 1, v)).copy_(self._log_softmax(clean_logits)[:, :-1])
            self.p = torch.exp(self.logp, out=self._buffer("p", (b, t - 1, v)))
        self.nll = self._nll_sum(self.logp)

    def _buffer(self, name: str, shape: tuple[int, int, int]) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.device != self.targets.device or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0]:
            buf = self._buffers[name] = torch.empty(shape, dtype=torch.float32, device=self.targets.device)
        return buf[: shape[0]]  # a smaller last batch: the leading rows, still contiguous

    def _log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Row by row over the whole [batch, seq, vocab] tensor (into a buffer): each row's values are those of
        ``F.log_softmax`` of the logits sliced to the loss positions, without its copies."""
        if tuple(logits.shape) != self._shape:
            raise SaeforgeError(f"logits of shape {tuple(logits.shape)} measured against a clean batch of shape "
                                f"{self._shape}", "measure the forwards of the batch the reference was built on")
        out = self._buffer("full", self._shape)
        torch._log_softmax(logits.float().contiguous(), -1, False, out=out)
        return out

    def _nll_sum(self, logp: torch.Tensor) -> float:
        nll = -logp.gather(-1, self.targets[..., None]).squeeze(-1)
        return float(nll[self.positions].double().sum())

    @torch.no_grad()
    def measure(self, logits: torch.Tensor) -> tuple[float, float]:
        """(Σ next-token NLL, Σ KL(p_clean ‖ p)) over the loss positions of a modified forward's ``logits``."""
        logp = self._log_softmax(logits)[:, :-1]
        nll = self._nll_sum(logp)
        kl = torch.sub(self.logp, logp, out=self._buffer("diff", tuple(self.logp.shape))).mul_(self.p).sum(-1)
        return nll, float(kl[self.positions].double().sum())


class DownstreamStats:
    """Accumulates one SAE's losses: :meth:`add_clean` with each batch's :class:`LogitReference`, then :meth:`add`
    for each modified forward of that batch (or, for one SAE alone, :meth:`update_clean` and :meth:`update` with
    logits)."""

    MODES = ("sae", "zero", "mean")

    def __init__(self):
        self.sum_ce = {m: 0.0 for m in ("clean",) + self.MODES}
        self.sum_kl = {m: 0.0 for m in self.MODES}
        self.n = 0
        self._reference: LogitReference | None = None

    def add_clean(self, reference: LogitReference) -> None:
        self.sum_ce["clean"] += reference.nll
        self.n += reference.n

    def add(self, mode: str, measured: tuple[float, float]) -> None:
        nll, kl = measured
        self.sum_ce[mode] += nll
        self.sum_kl[mode] += kl

    def update_clean(self, input_ids: torch.Tensor, keep: torch.Tensor, logits: torch.Tensor) -> None:
        self._reference = LogitReference(input_ids, keep, logits)
        self.add_clean(self._reference)

    def update(self, mode: str, logits: torch.Tensor) -> None:
        self.add(mode, self._reference.measure(logits))

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
