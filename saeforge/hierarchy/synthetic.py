"""Synthetic hierarchical activations with a known feature tree, and how well a learned tree recovers it.

A tree of unit directions in R^d: ``n_roots`` roots, each node of depth ℓ with ``branching[ℓ]`` children. A child's
direction leans towards its parent's (``cos ≈ child_similarity``), as a sub-concept's does towards its concept.
Per sample, every root is active independently (probabilities from a power law adding up to ``mean_active_roots``);
an active node activates one of its children with probability ``child_probability`` (chosen uniformly; siblings
exclude each other, as "dog" and "cat" under "animal"), so **a child fires only with its parent**. The sample is
x = Σ_active m_node · dir_node with log-normal magnitudes m (median 1 for the roots, ``child_scale`` per depth below
them, σ ``magnitude_sigma``). ``parent_with_child`` scales a parent's own magnitude on the samples where one of its
children fires: 1 (the default) adds the child to its parent; 0 lets the child, which leans towards its parent's
direction, stand in for it (the finer concept *splits* the coarse one, as in the picture behind HSAE's structural
loss, arXiv 2602.11881).

:func:`edge_recovery` scores a learned tree against the truth: the true nodes of each depth are matched one to one
to the learned latents of that level so that their firing agrees best (Jaccard index, summed over the matches:
Hungarian assignment); a true edge (P → C) is recovered when the latent matched to C has the latent matched to P as
its parent. One to one, because with each node simply matched to its best latent a level that copied the roots and
learned no child at all scores every edge (the four children of a root all match the root's copy, whose parent is
the root); ``one_to_one=False`` gives that older score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from saeforge.errors import SaeforgeError
from saeforge.evals.synthetic import _power_law_frequencies

__all__ = ["HierarchicalFeatureModel", "edge_recovery", "jaccard_matches"]


@dataclass
class HierarchicalFeatureModel:
    """The ground truth: directions and parents per depth, root frequencies. Draw samples with :meth:`sample`."""

    directions: list[Tensor]   # per depth: [n_ℓ, d] unit rows
    parents: list[Tensor]      # per depth from 1: [n_ℓ] index of the parent in depth ℓ-1
    root_frequencies: Tensor   # [n_roots]
    child_probability: float
    magnitude_sigma: float = 0.3
    child_scale: float = 1.0
    parent_with_child: float = 1.0

    @classmethod
    def create(cls, d: int = 64, n_roots: int = 16, branching: Sequence[int] = (4,), *,
               mean_active_roots: float = 2.0, child_probability: float = 0.8, child_similarity: float = 0.5,
               frequency_exponent: float = 0.3, magnitude_sigma: float = 0.3, child_scale: float = 1.0,
               parent_with_child: float = 1.0, seed: int = 0) -> "HierarchicalFeatureModel":
        if not (isinstance(d, int) and d > 0 and isinstance(n_roots, int) and n_roots > 0):
            raise SaeforgeError(f"d and n_roots must be positive integers, got {d!r}, {n_roots!r}",
                                "e.g. d=64, n_roots=16")
        if not branching or not all(isinstance(b, int) and b > 0 for b in branching):
            raise SaeforgeError(f"branching must list positive integers (children per node, per depth), got "
                                f"{branching!r}", "e.g. branching=(4,) for roots with 4 children each")
        if not 0 < mean_active_roots <= n_roots:
            raise SaeforgeError(f"mean_active_roots must be in (0, n_roots={n_roots}], got {mean_active_roots!r}",
                                "it is the expected number of active roots per sample")
        for name, v in (("child_probability", child_probability), ("child_similarity", child_similarity),
                        ("parent_with_child", parent_with_child)):
            if not (0 <= v < 1 if name == "child_similarity" else 0 <= v <= 1):
                raise SaeforgeError(f"{name} must be in [0, 1{')' if name == 'child_similarity' else ']'}, got {v!r}",
                                    f"pass e.g. {name}=0.5")
        if not child_scale > 0:
            raise SaeforgeError(f"child_scale must be positive, got {child_scale!r}",
                                "pass e.g. child_scale=0.5 (children's magnitudes half their parents')")
        g = torch.Generator().manual_seed(int(seed))

        def unit(n: int) -> Tensor:
            v = torch.randn(n, d, generator=g, dtype=torch.float64)
            return v / v.norm(dim=1, keepdim=True)

        directions, parents = [unit(n_roots)], []
        for b in branching:
            above = directions[-1]
            parent = torch.arange(above.shape[0]).repeat_interleave(b)
            own = unit(parent.numel())
            own = own - (own * above[parent]).sum(1, keepdim=True) * above[parent]  # orthogonal to the parent
            own = own / own.norm(dim=1, keepdim=True)
            a = float(child_similarity)
            directions.append(a * above[parent] + (1 - a * a) ** 0.5 * own)
            parents.append(parent)
        freqs = _power_law_frequencies(n_roots, float(mean_active_roots), float(frequency_exponent)).float()
        return cls([t.float() for t in directions], parents, freqs, float(child_probability), float(magnitude_sigma),
                   float(child_scale), float(parent_with_child))

    @property
    def d(self) -> int:
        return int(self.directions[0].shape[1])

    @property
    def widths(self) -> list[int]:
        return [int(t.shape[0]) for t in self.directions]

    def sample(self, n_samples: int, *, seed: int | None = None,
               generator: torch.Generator | None = None) -> tuple[Tensor, list[Tensor]]:
        """(data [n, d], activity per depth: bool [n, n_ℓ])."""
        g = generator or torch.Generator().manual_seed(int(seed or 0))
        n = int(n_samples)
        active = [torch.rand(n, self.widths[0], generator=g) < self.root_frequencies]
        for depth, parent in enumerate(self.parents, start=1):
            above = active[-1]
            b = parent.numel() // above.shape[1]
            pick = torch.randint(0, b, (n, above.shape[1]), generator=g)
            go = above & (torch.rand(n, above.shape[1], generator=g) < self.child_probability)
            child = torch.zeros(n, parent.numel(), dtype=torch.bool)
            rows, cols = torch.nonzero(go, as_tuple=True)
            child[rows, cols * b + pick[rows, cols]] = True
            active.append(child)
        magnitudes = [torch.exp(self.magnitude_sigma * torch.randn(n, act.shape[1], generator=g))
                      * self.child_scale ** depth for depth, act in enumerate(active)]
        if self.parent_with_child != 1:
            for depth, parent in enumerate(self.parents, start=1):
                b = parent.numel() // active[depth - 1].shape[1]
                has_child = active[depth].view(n, -1, b).any(-1)
                magnitudes[depth - 1] = torch.where(has_child, self.parent_with_child * magnitudes[depth - 1],
                                                    magnitudes[depth - 1])
        x = torch.zeros(n, self.d)
        for act, m, dirs in zip(active, magnitudes, self.directions):
            x += (act * m) @ dirs
        return x, active


def jaccard_matches(latents_active: Tensor, truth_active: Tensor, *, one_to_one: bool = False
                    ) -> tuple[Tensor, Tensor]:
    """For every true feature (column of ``truth_active [n, m]``), the latent (column of ``latents_active [n, k]``)
    with the highest Jaccard index of their firing, and that index. ``one_to_one``: no latent serves two features
    (the assignment with the largest total Jaccard index); features left without a latent that ever fires with them
    get latent -1 and index 0."""
    a = latents_active.float()
    t = truth_active.float()
    inter = t.T @ a                                     # [m, k]
    union = t.sum(0)[:, None] + a.sum(0)[None, :] - inter
    jac = inter / union.clamp_min(1)
    if not one_to_one:
        best, index = jac.max(dim=1)
        return index, best
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as err:  # pragma: no cover - scipy comes with the dev, flow and circuits extras
        raise SaeforgeError("one-to-one matching needs scipy", "pip install 'saeforge[flow]' (or scipy)") from err
    rows, cols = linear_sum_assignment(jac.double().numpy(), maximize=True)
    index = torch.full((jac.shape[0],), -1, dtype=torch.long)
    best = torch.zeros(jac.shape[0])
    index[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    best[torch.from_numpy(rows)] = jac[torch.from_numpy(rows), torch.from_numpy(cols)]
    index[best <= 0] = -1  # a latent that never fires with the feature is no match, whatever is left over
    return index, best


def edge_recovery(tree, levels_active: list[Tensor], truth: HierarchicalFeatureModel,
                  truth_active: list[Tensor], *, one_to_one: bool = True) -> dict[str, float]:
    """Fraction of true edges (parent → child, every depth) that the learned ``tree`` recovers, with the mean
    Jaccard index of the matches. ``levels_active``: the learned levels' firing ``[n, width]`` on the samples
    whose true activity is ``truth_active`` (one per depth; the tree needs as many levels as the truth has depths).
    ``one_to_one``: each true node has a latent of its own (see the module docstring)."""
    if tree.n_levels != len(truth.directions):
        raise SaeforgeError(f"the tree has {tree.n_levels} levels, the truth {len(truth.directions)} depths",
                            "train one level per depth of the synthetic tree")
    matches = [jaccard_matches(a, t, one_to_one=one_to_one) for a, t in zip(levels_active, truth_active)]
    hits, total = 0, 0
    for depth, parent in enumerate(truth.parents, start=1):
        latent_of_child, _ = matches[depth]
        latent_of_parent, _ = matches[depth - 1]
        learned_parent = torch.as_tensor(tree.parents[depth - 1])[latent_of_child.clamp_min(0)]
        recovered = (learned_parent == latent_of_parent[parent]) & (latent_of_child >= 0) & (learned_parent >= 0)
        hits += int(recovered.sum())
        total += parent.numel()
    return {"edge_recovery": hits / max(total, 1),
            "mean_jaccard": float(torch.cat([m[1] for m in matches]).mean()),
            "true_edges": total}

