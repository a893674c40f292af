"""What a two-model crosscoder says about the difference between its models: relative decoder norms, shared and
exclusive latents, and where the exclusive ones fire.

A crosscoder over model A and model B (:mod:`saeforge.saes.crosscoder`) gives every latent a decoder on each model,
``d_A`` and ``d_B``. Its relative norm (Lindsey et al., crosscoders, 2024; Minder et al., arXiv 2504.02922)

    r = ||d_B|| / (||d_A|| + ||d_B||)        in the space the crosscoder was trained in (each site normalised)

is 0.5 for a latent both models use alike, near 0 for one only A has, near 1 for one only B has. Latents that never
fire on the evaluation text are left out (their decoders say nothing). For the latents used by both, the cosine of
``d_A`` and ``d_B`` tells whether they also point the same way.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from saeforge.errors import SaeforgeError

__all__ = ["ExampleTracker", "NormClasses", "classify", "decoder_cosines", "lean_by_text", "relative_norms",
           "norm_histogram"]


@torch.no_grad()
def relative_norms(sae: Any, scales: Sequence[float] | None = None) -> Tensor:
    """r [d_sae] of a crosscoder over two sites (A first): ||d_B|| / (||d_A|| + ||d_B||); ``scales``: the sites'
    output scales (the trainer's per-site normalisation, folded into the saved weights), to compare the norms in
    the normalised space."""
    if getattr(sae.cfg, "n_sites", None) != 2:
        raise SaeforgeError(f"relative decoder norms need a crosscoder over two sites (model A and model B), got "
                            f"{getattr(sae.cfg, 'n_sites', 1)} site(s)",
                            "train a crosscoder on one site of each model (saeforge diff)")
    norms = sae.decoder_norms(scales)
    total = norms.sum(1).clamp_min(1e-12)
    return norms[:, 1] / total


@torch.no_grad()
def decoder_cosines(sae: Any) -> Tensor:
    """cos(d_A, d_B) [d_sae] (scale-free, so no normalisation is needed)."""
    n, d = sae.cfg.n_sites, sae.cfg.d_site_out
    w = sae.W_dec.detach().float().reshape(sae.cfg.d_sae, n, d)
    return torch.nn.functional.cosine_similarity(w[:, 0], w[:, 1], dim=1)


@dataclass
class NormClasses:
    """Indices of the latents in each class (alive latents only)."""

    exclusive_a: Tensor
    exclusive_b: Tensor
    shared: Tensor
    other: Tensor
    dead: Tensor

    def counts(self) -> dict[str, int]:
        return {k: int(getattr(self, k).numel()) for k in ("exclusive_a", "exclusive_b", "shared", "other", "dead")}


def classify(r: Tensor, alive: Tensor, *, exclusive: float = 0.1, shared: float = 0.1) -> NormClasses:
    """Exclusive to A: r <= ``exclusive``; to B: r >= 1 - ``exclusive``; shared: |r - 0.5| <= ``shared``."""
    if not 0 < exclusive < 0.5 or not 0 < shared < 0.5:
        raise SaeforgeError(f"the class bounds must lie in (0, 0.5), got exclusive={exclusive}, shared={shared}",
                            "pass e.g. --exclusive 0.1 --shared 0.1")
    alive = alive.bool()
    idx = torch.arange(r.numel())
    a = alive & (r <= exclusive)
    b = alive & (r >= 1 - exclusive)
    s = alive & ((r - 0.5).abs() <= shared)
    return NormClasses(idx[a], idx[b], idx[s], idx[alive & ~(a | b | s)], idx[~alive])


def norm_histogram(r: Tensor, alive: Tensor, bins: int = 50) -> dict[str, list]:
    """Counts of the alive latents' relative norms in ``bins`` equal bins over [0, 1]."""
    counts = torch.histc(r[alive.bool()].float(), bins=bins, min=0.0, max=1.0)
    edges = torch.linspace(0, 1, bins + 1)
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


@torch.no_grad()
def lean_by_text(r: Tensor, cos: Tensor, fired_focus: Tensor, tokens_focus: int, fired_other: Tensor,
                 tokens_other: int, *, ratio: float = 2.0, min_fired: int = 5) -> dict[str, Any]:
    """How the latents' relative norms and decoder cosines depend on where they fire: what a fine-tune changed
    when it made no latent exclusive. Latents firing at least ``min_fired`` times are grouped by their firing rate on
    the focus text (e.g. the fine-tuning text) over that on other text: ``focus`` (>= ``ratio``), ``other``
    (<= 1 / ``ratio``) and ``both``; per group the count and the mean r and cosine, and over all of them the rank
    correlation (Spearman) of r, and of 1 - cosine, with the log rate ratio."""
    if tokens_focus <= 0 or tokens_other <= 0:
        raise SaeforgeError("the lean of latents by text needs tokens of both texts",
                            "analyse both the focus text and other text (--focus-text, --eval-corpus)")
    rate_f = fired_focus.double() / tokens_focus
    rate_o = fired_other.double() / tokens_other
    counted = (fired_focus + fired_other) >= min_fired
    idx = torch.nonzero(counted).flatten()
    # half a firing added to both rates, so a latent silent on one text has a finite ratio
    log_ratio = torch.log((rate_f + 0.5 / tokens_focus) / (rate_o + 0.5 / tokens_other))[idx]
    groups = {"focus": log_ratio >= math.log(ratio), "other": log_ratio <= -math.log(ratio)}
    groups["both"] = ~(groups["focus"] | groups["other"])
    out: dict[str, Any] = {"ratio": ratio, "min_fired": min_fired, "latents": int(idx.numel()), "groups": {}}
    for name, mask in groups.items():
        sel = idx[mask]
        out["groups"][name] = {"latents": int(sel.numel()),
                               "mean_relative_norm": float(r[sel].mean()) if sel.numel() else None,
                               "mean_decoder_cosine": float(cos[sel].mean()) if sel.numel() else None}

    def spearman(a: Tensor, b: Tensor) -> float | None:
        if a.numel() < 3:
            return None
        ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
        ra, rb = ra - ra.mean(), rb - rb.mean()
        return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))

    out["spearman_relative_norm"] = spearman(r[idx].double(), log_ratio)
    out["spearman_one_minus_cosine"] = spearman(1 - cos[idx].double(), log_ratio)
    return out


@dataclass
class ExampleTracker:
    """The ``n`` strongest activations of chosen latents over a pass: (value, context index, position), plus how
    often each fired on each source of text (e.g. the fine-tuning text and other text)."""

    latents: Sequence[int]
    n: int = 8
    sources: Sequence[str] = ("focus", "other")
    heaps: dict[int, list] = field(default_factory=dict)
    fired: dict[str, Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.heaps = {int(j): [] for j in self.latents}
        self._cols = torch.tensor([int(j) for j in self.latents], dtype=torch.long)

    @torch.no_grad()
    def update(self, source: str, f: Tensor, context: Tensor, position: Tensor, d_sae: int) -> None:
        """``f`` [n_tokens, d_sae] latents of kept positions; ``context``/``position`` [n_tokens] where they are."""
        if source not in self.fired:
            self.fired[source] = torch.zeros(d_sae, dtype=torch.long)
            self.tokens[source] = 0
        self.fired[source] += (f > 0).sum(0).cpu()
        self.tokens[source] += f.shape[0]
        if not len(self.latents):
            return
        sub = f[:, self._cols.to(f.device)].float().cpu()
        k = min(self.n, sub.shape[0])
        vals, rows = sub.topk(k, dim=0)
        for c, j in enumerate(self._cols.tolist()):
            heap = self.heaps[j]
            for v, row in zip(vals[:, c].tolist(), rows[:, c].tolist()):
                if v <= 0:
                    break
                item = (v, source, int(context[row]), int(position[row]))
                if len(heap) < self.n:
                    heapq.heappush(heap, item)
                elif v > heap[0][0]:
                    heapq.heapreplace(heap, item)

    def top(self, j: int) -> list[tuple[float, str, int, int]]:
        return sorted(self.heaps[int(j)], reverse=True)

    def rates(self, j: int) -> dict[str, float]:
        """Fraction of each source's tokens on which latent j fired."""
        return {s: float(self.fired[s][int(j)]) / max(self.tokens[s], 1) for s in self.fired}

    def focus_share(self, j: int, focus: str = "focus") -> float:
        """Share of latent j's top examples that come from the ``focus`` text (NaN when it has none)."""
        top = self.top(j)
        return sum(1 for t in top if t[1] == focus) / len(top) if top else math.nan
