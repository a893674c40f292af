"""Hierarchy metrics for any feature tree (HSAE, post-hoc, Matryoshka groups), from the levels' firing on held-out
activations (arXiv 2602.11881, section 5):

- **P(parent | child)** ("necessity"): of the tokens where a child fires, the fraction where its parent fires too;
  averaged over assigned pairs whose child fires at least once.
- **P(child | parent)** ("coverage"): of the tokens where a parent fires, the fraction where the child fires;
  averaged over assigned pairs whose parent fires at least once.
- **Hamming distance** between a parent's binary firing pattern and the OR of its children's, per parent with
  children. The paper does not say over how many tokens it counts; saeforge reports it **per 1,000 tokens**, so
  only the ratio between methods compares with the paper's figures.

Beside them, per level: L0 (active latents of the level per token), FVU and explained variance of the level's own
reconstruction (an HSAE level: that level alone; an SAE: the SAE; a Matryoshka group: the prefix that ends with the
group, i.e. the nested dictionary it completes) with the pooled dataset-mean denominator of ``saeforge eval``, and
the fraction of the level's latents that never fire.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor

from saeforge.errors import SaeforgeError
from saeforge.hierarchy.tree import FeatureTree

__all__ = ["PairStats", "TreeMetrics", "encode_levels", "level_reconstruction", "tree_metrics"]


def encode_levels(levels: list[tuple[Any, slice]], x: Tensor) -> tuple[list[Tensor], dict[int, Tensor]]:
    """Latents of every level ``[n, width]`` for activations ``x [n, d]``; each SAE encodes once. Also returns the
    full latents per SAE (keyed by ``id(sae)``) for the reconstructions."""
    full: dict[int, Tensor] = {}
    out = []
    for sae, sl in levels:
        if id(sae) not in full:
            full[id(sae)] = sae.encode(x.to(sae.device, sae.dtype))
        out.append(full[id(sae)][:, sl])
    return out, full


def level_reconstruction(sae, sl: slice, f: Tensor) -> Tensor:
    """What a level reconstructs from its SAE's full latents ``f``: an HSAE level on its own, a whole SAE through
    its decoder, a block of latents as the prefix of the dictionary it ends (a Matryoshka group)."""
    slices = getattr(sae.cfg, "level_slices", None)
    if slices is not None and sl in slices:
        return sae.level_reconstruction(f, slices.index(sl))
    if sl.start == 0 and sl.stop == sae.cfg.d_sae:
        return sae.decode(f)
    return f[:, :sl.stop].to(sae.dtype) @ sae.W_dec[:sl.stop] + sae.b_dec


@dataclass
class PairStats:
    """Per-pair and per-parent figures of one level pair (arrays aligned with the tree's ``pairs(level)``)."""

    parent_level: int
    parents: np.ndarray                 # parent index of each pair
    children: np.ndarray                # child index of each pair
    p_parent_given_child: np.ndarray    # NaN where the child never fired
    p_child_given_parent: np.ndarray    # NaN where the parent never fired
    hamming_parents: np.ndarray         # parents with children
    hamming_per_1k: np.ndarray          # their Hamming distance per 1,000 tokens

    def summary(self) -> dict[str, Any]:
        def mean(a: np.ndarray) -> float:
            a = a[np.isfinite(a)]
            return float(a.mean()) if a.size else math.nan

        return {"parent_level": self.parent_level, "pairs": int(self.children.size),
                "pairs_child_fired": int(np.isfinite(self.p_parent_given_child).sum()),
                "parents_with_children": int(self.hamming_parents.size),
                "p_parent_given_child": mean(self.p_parent_given_child),
                "p_child_given_parent": mean(self.p_child_given_parent),
                "hamming_per_1k": mean(self.hamming_per_1k)}

    def for_child(self, child: int) -> dict[str, float]:
        i = np.flatnonzero(self.children == child)
        if not i.size:
            return {}
        def value(a: np.ndarray) -> float | None:  # None where the child (parent) never fired
            v = float(a[i[0]])
            return v if math.isfinite(v) else None

        return {"p_parent_given_child": value(self.p_parent_given_child),
                "p_child_given_parent": value(self.p_child_given_parent)}

    def for_parent(self, parent: int) -> float | None:
        i = np.flatnonzero(self.hamming_parents == parent)
        return float(self.hamming_per_1k[i[0]]) if i.size else None


@dataclass
class TreeMetrics:
    tokens: int
    levels: list[dict[str, Any]]
    pairs: list[PairStats] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The tree-wide averages (over all assigned pairs / parents with children) and the per-level figures."""
        pc = np.concatenate([p.p_parent_given_child for p in self.pairs]) if self.pairs else np.zeros(0)
        cp = np.concatenate([p.p_child_given_parent for p in self.pairs]) if self.pairs else np.zeros(0)
        hm = np.concatenate([p.hamming_per_1k for p in self.pairs]) if self.pairs else np.zeros(0)

        def mean(a):
            a = a[np.isfinite(a)]
            return float(a.mean()) if a.size else math.nan

        return {"tokens": self.tokens, "p_parent_given_child": mean(pc), "p_child_given_parent": mean(cp),
                "hamming_per_1k": mean(hm), "levels": self.levels,
                "level_pairs": [p.summary() for p in self.pairs]}

    def to_dict(self) -> dict[str, Any]:
        """The summary plus every pair's figures (what the dashboard's tree view reads)."""
        out = self.summary()
        out["per_pair"] = [{"parent_level": p.parent_level, "parents": p.parents.tolist(),
                            "children": p.children.tolist(),
                            "p_parent_given_child": _json_floats(p.p_parent_given_child),
                            "p_child_given_parent": _json_floats(p.p_child_given_parent),
                            "hamming_parents": p.hamming_parents.tolist(),
                            "hamming_per_1k": _json_floats(p.hamming_per_1k)} for p in self.pairs]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TreeMetrics":
        pairs = [PairStats(p["parent_level"], np.asarray(p["parents"], dtype=np.int64),
                           np.asarray(p["children"], dtype=np.int64), _np_floats(p["p_parent_given_child"]),
                           _np_floats(p["p_child_given_parent"]), np.asarray(p["hamming_parents"], dtype=np.int64),
                           _np_floats(p["hamming_per_1k"])) for p in data.get("per_pair", [])]
        return cls(int(data["tokens"]), list(data["levels"]), pairs)


def _json_floats(a: np.ndarray) -> list:
    return [None if not math.isfinite(v) else round(float(v), 6) for v in a]


def _np_floats(a: list) -> np.ndarray:
    return np.asarray([math.nan if v is None else v for v in a], dtype=np.float64)


@torch.no_grad()
def tree_metrics(tree: FeatureTree, batches: Iterable[Tensor], *, levels: list[tuple[Any, slice]] | None = None,
                 device: str | torch.device = "cpu", progress: bool = False) -> TreeMetrics:
    """Hierarchy and per-level metrics of ``tree`` over activation ``batches`` (``[n, d]`` each, raw activations
    of the site the SAEs read). ``levels``: the tree's (SAE, slice) pairs if already loaded."""
    from tqdm.auto import tqdm

    levels = levels if levels is not None else tree.load_levels(device=device)
    n_levels = tree.n_levels
    widths = tree.widths
    dev = levels[0][0].device
    fire = [torch.zeros(w, dtype=torch.float64, device=dev) for w in widths]
    layouts = []
    for lv in range(n_levels - 1):
        par, child = tree.pairs(lv)
        pt, ct = torch.as_tensor(par, device=dev), torch.as_tensor(child, device=dev)
        has = torch.unique(pt)
        layouts.append((pt, ct, has))
    joint = [torch.zeros(len(ct), dtype=torch.float64, device=dev) for _, ct, _ in layouts]
    hamming = [torch.zeros(len(has), dtype=torch.float64, device=dev) for _, _, has in layouts]
    sq_err = [0.0] * n_levels
    l0_sum = [0.0] * n_levels
    sum_x, sum_sq_x, n = None, 0.0, 0
    bar = tqdm(unit="tok", unit_scale=True, desc="tree metrics", disable=not progress, dynamic_ncols=True)
    for x in batches:
        x = x.to(dev, torch.float32)
        if x.dim() != 2 or x.shape[1] != levels[0][0].cfg.d_in:
            raise SaeforgeError(f"activations must be [n, {levels[0][0].cfg.d_in}], got {tuple(x.shape)}",
                                "pass activations of the site the tree's SAEs read")
        codes, full = encode_levels(levels, x)
        active = [c > 0 for c in codes]
        for lv, (sae, sl) in enumerate(levels):
            fire[lv] += active[lv].sum(0)
            l0_sum[lv] += float(active[lv].sum())
            rec = level_reconstruction(sae, sl, full[id(sae)])
            sq_err[lv] += float((x.double() - rec.double()).pow(2).sum())
        for lv, (pt, ct, has) in enumerate(layouts):
            if not len(ct):
                continue
            a_p, a_c = active[lv], active[lv + 1]
            joint[lv] += (a_p[:, pt] & a_c[:, ct]).sum(0)
            children_firing = torch.zeros(x.shape[0], widths[lv], dtype=torch.float32, device=dev)
            children_firing.index_add_(1, pt, a_c[:, ct].float())  # > 0: the OR of the children
            hamming[lv] += (a_p[:, has] != (children_firing[:, has] > 0)).sum(0)
        xd = x.double()
        sum_x = xd.sum(0) if sum_x is None else sum_x + xd.sum(0)
        sum_sq_x += float(xd.pow(2).sum())
        n += x.shape[0]
        bar.update(x.shape[0])
    bar.close()
    if n == 0:
        raise SaeforgeError("no activations to measure the tree on", "give more tokens (--tokens) or a larger corpus")
    total_var = sum_sq_x - float(sum_x.pow(2).sum()) / n
    level_rows = []
    for lv in range(n_levels):
        fvu = sq_err[lv] / total_var if total_var > 0 else math.nan
        level_rows.append({"name": tree.levels[lv].name, "width": widths[lv], "l0": l0_sum[lv] / n, "fvu": fvu,
                           "explained_variance": 1 - fvu, "dead_fraction": float((fire[lv] == 0).double().mean())})
    pairs = []
    for lv, (pt, ct, has) in enumerate(layouts):
        fp, fc, j = fire[lv][pt], fire[lv + 1][ct], joint[lv]
        with np.errstate(invalid="ignore", divide="ignore"):
            ppc = np.where(fc.cpu().numpy() > 0, (j / fc).cpu().numpy(), np.nan)
            pcp = np.where(fp.cpu().numpy() > 0, (j / fp).cpu().numpy(), np.nan)
        pairs.append(PairStats(lv, pt.cpu().numpy(), ct.cpu().numpy(), ppc, pcp, has.cpu().numpy(),
                               (hamming[lv] * 1000.0 / n).cpu().numpy()))
    return TreeMetrics(n, level_rows, pairs)
