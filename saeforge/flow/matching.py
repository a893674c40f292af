"""Matching the features of two SAEs whose outputs live in one space (Laptev et al., arXiv 2502.03032, §3).

Data-free matching compares decoder directions: with unit-norm decoder rows, the cosine of feature i of SAE A and
feature j of SAE B is ``(W_dec^A W_dec^Bᵀ)[i, j]``. Methods:

- ``top1``: j = argmax_j cos(i, j), with the score s = max_j cos(i, j);
- ``topk``: the k best j, kept only where the cosine is positive (the paper's T = 1_{x>0}(top_k(W_dec^A W_dec^Bᵀ)));
- ``permutation``: a one-to-one assignment maximising the summed cosine (the Hungarian method through scipy's
  ``linear_sum_assignment``), Balagansky et al.'s SAE Match (arXiv 2410.07656) without parameter folding;
- ``pearson``: the data-based comparison, Pearson correlation of the two SAEs' activations on the same tokens.

Everything top-k is computed in blocks of A's rows against blocks of B's rows with a running top-k, so two 65k-wide
SAEs match without a 65k × 65k matrix in memory (peak: one ``block_a × block_b`` block). The permutation needs the
whole matrix by nature and is refused above :data:`MAX_PERMUTATION`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from saeforge.errors import SaeforgeError

METHODS = ("top1", "topk", "permutation", "pearson")
MAX_PERMUTATION = 16_384  # a dense float64 cost matrix of this side is 2 GiB; beyond it, use top-k matches


@dataclass
class Matches:
    """For each feature of SAE ``a``, its matches in SAE ``b``: ``indices``/``scores`` ``[d_a, k]``, best first;
    index −1 (score 0) where there is none (a non-positive cosine in ``topk``, a dead feature in ``pearson``)."""

    a: str
    b: str
    method: str
    indices: torch.Tensor  # int64 [d_a, k]
    scores: torch.Tensor  # float32 [d_a, k]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    @property
    def top1(self) -> torch.Tensor:
        """Best match of every feature of ``a`` (−1: none)."""
        return self.indices[:, 0]

    @property
    def s(self) -> torch.Tensor:
        """The paper's s score of every feature of ``a``: its best similarity in ``b``."""
        return self.scores[:, 0]

    def share_above(self, threshold: float) -> float:
        """Share of ``a``'s features with a match of similarity ≥ ``threshold``."""
        return float((self.s >= threshold).float().mean())


def check_threshold(value: float, name: str) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise SaeforgeError(f"{name} must lie in [0, 1], got {value!r}", f"pass e.g. --{name.replace('_', '-')} 0.5")
    return float(value)


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def blocked_topk(a: torch.Tensor, b: torch.Tensor, k: int, *, block_a: int = 2048, block_b: int = 8192
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of ``a @ b.T`` per row of ``a`` (values, indices ``[n_a, k]``, best first), one
    ``block_a × block_b`` block at a time with a running top-k."""
    if a.shape[1] != b.shape[1]:
        raise SaeforgeError(f"cannot compare vectors of width {a.shape[1]} with width {b.shape[1]}",
                            "match SAEs whose outputs live in one space")
    k = min(k, b.shape[0])
    n_a = a.shape[0]
    values = torch.empty(n_a, k, dtype=torch.float32)
    indices = torch.empty(n_a, k, dtype=torch.int64)
    for i in range(0, n_a, block_a):
        rows = a[i:i + block_a]
        for j in range(0, b.shape[0], block_b):
            sim = rows @ b[j:j + block_b].T
            if k == 1:  # max is several times cheaper than topk over a block
                v, ix = sim.max(dim=1, keepdim=True)
            else:
                v, ix = sim.topk(min(k, sim.shape[1]), dim=1, sorted=True)
            if j == 0:
                best_v, best_i = v, ix
                continue
            # earlier blocks first: on equal values the stable sort keeps the earlier (lower) index
            cat_v, cat_i = torch.cat([best_v, v], 1), torch.cat([best_i, ix + j], 1)
            order = torch.sort(cat_v, dim=1, descending=True, stable=True).indices[:, :k]
            best_v, best_i = cat_v.gather(1, order), cat_i.gather(1, order)
        values[i:i + rows.shape[0]] = best_v
        indices[i:i + rows.shape[0]] = best_i
    return values, indices


def match_decoders(w_a: torch.Tensor, w_b: torch.Tensor, method: str = "top1", *, k: int = 5, a: str = "a",
                   b: str = "b", block_a: int = 2048, block_b: int = 8192) -> Matches:
    """Match decoder rows ``w_a [d_a, d]`` to ``w_b [d_b, d]`` by cosine (``top1``, ``topk`` or ``permutation``)."""
    if method not in ("top1", "topk", "permutation"):
        raise SaeforgeError(f"unknown decoder matching method {method!r}", "use top1, topk or permutation")
    if w_a.shape[1] != w_b.shape[1]:
        raise SaeforgeError(f"{a} writes width {w_a.shape[1]} but {b} writes {w_b.shape[1]}",
                            "match SAEs of one model (the residual width must agree)")
    ua, ub = unit_rows(w_a), unit_rows(w_b)
    if method == "permutation":
        return _permutation(ua, ub, a, b)
    if k < 1:
        raise SaeforgeError(f"k must be at least 1, got {k}", "pass --k 5")
    values, indices = blocked_topk(ua, ub, 1 if method == "top1" else k, block_a=block_a, block_b=block_b)
    if method == "topk":
        none = values <= 0
        values, indices = values.masked_fill(none, 0.0), indices.masked_fill(none, -1)
    return Matches(a, b, method, indices, values)


def _permutation(ua: torch.Tensor, ub: torch.Tensor, a: str, b: str) -> Matches:
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as err:  # pragma: no cover - scipy comes with the dev and flow extras
        raise SaeforgeError("permutation matching needs scipy", "pip install 'saeforge[flow]' (or scipy)") from err
    n_a, n_b = ua.shape[0], ub.shape[0]
    if max(n_a, n_b) > MAX_PERMUTATION:
        raise SaeforgeError(f"a one-to-one permutation of {n_a} × {n_b} features needs the whole cosine matrix "
                            f"(limit {MAX_PERMUTATION} a side)", "use --methods top1 or topk, which run in blocks")
    cos = (ua @ ub.T).double().numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    indices = torch.full((n_a, 1), -1, dtype=torch.int64)
    scores = torch.zeros(n_a, 1)
    indices[torch.from_numpy(rows), 0] = torch.from_numpy(cols).long()
    scores[torch.from_numpy(rows), 0] = torch.from_numpy(cos[rows, cols]).float()
    return Matches(a, b, "permutation", indices, scores, {"mean_cosine": float(cos[rows, cols].mean())})


@torch.no_grad()
def pearson_match(acts_a: torch.Tensor, acts_b: torch.Tensor, *, k: int = 1, a: str = "a", b: str = "b",
                  block_a: int = 2048, block_b: int = 8192) -> Matches:
    """Match by Pearson correlation of activations ``[n_tokens, d_a]`` and ``[n_tokens, d_b]`` (the same tokens).
    Features that never vary on these tokens get no match (−1)."""
    if acts_a.shape[0] != acts_b.shape[0]:
        raise SaeforgeError(f"the activations cover {acts_a.shape[0]} and {acts_b.shape[0]} tokens",
                            "encode the same tokens with both SAEs")

    def standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.double()
        x = x - x.mean(0)
        sd = x.norm(dim=0)
        return (x / sd.clamp_min(1e-12)).float().T.contiguous(), sd > 0

    za, live_a = standardise(acts_a)
    zb, live_b = standardise(acts_b)
    zb[~live_b] = 0.0  # dead columns can never be chosen over a live one with a positive correlation
    values, indices = blocked_topk(za, zb, k, block_a=block_a, block_b=block_b)
    none = (values <= 0) | ~live_a[:, None]
    return Matches(a, b, "pearson", indices.masked_fill(none, -1), values.masked_fill(none, 0.0),
                   {"tokens": int(acts_a.shape[0])})


# ---------------------------------------------------------------------------------------------------- in a suite
PREDECESSORS = (("R", "resid_post", -1), ("M", "mlp_out", 0), ("A", "attn_out", 0))
"""The three predecessors of R_L: (letter, site kind, layer offset)."""


def predecessor_matches(suite, layer: int, method: str = "top1", *, k: int = 5) -> dict[str, Matches]:
    """``{"R": …, "M": …, "A": …}``: the residual features of ``layer`` matched backwards to R_{L-1}, M_L and A_L
    (those the suite holds)."""
    from saeforge.flow.suite import check_same_space

    target = suite.sae(layer, "resid_post")
    out = {}
    for letter, kind, offset in PREDECESSORS:
        if not suite.has(layer + offset, kind):
            continue
        pred = suite.sae(layer + offset, kind)
        check_same_space(target, pred)
        out[letter] = match_decoders(target.sae.W_dec, pred.sae.W_dec, method, k=k, a=target.site, b=pred.site)
    return out


def compare_saes(w_a: torch.Tensor, w_b: torch.Tensor, thresholds=(0.5, 0.7, 0.9), *, a: str = "a",
                 b: str = "b") -> dict[str, Any]:
    """Two SAEs of one site (another seed, another width): the share of each one's features whose best decoder
    match in the other has cosine ≥ each threshold, and the mean best cosine."""
    ab = match_decoders(w_a, w_b, "top1", a=a, b=b)
    ba = match_decoders(w_b, w_a, "top1", a=b, b=a)
    return {"a": a, "b": b, "d_a": int(w_a.shape[0]), "d_b": int(w_b.shape[0]),
            "mean_best_cosine_a_in_b": float(ab.s.mean()), "mean_best_cosine_b_in_a": float(ba.s.mean()),
            "share_a_matched": {str(t): ab.share_above(t) for t in thresholds},
            "share_b_matched": {str(t): ba.share_above(t) for t in thresholds},
            "mutual_top1": float(((ba.top1[ab.top1.clamp_min(0)] == torch.arange(w_a.shape[0])) & (ab.top1 >= 0))
                                 .float().mean())}
