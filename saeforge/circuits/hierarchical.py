"""Hierarchical decomposition of an attribution graph (HAGD; Uddin, Alam, Pasha, arXiv 2601.12879), built as an
option and always reported beside controls.

The paper claims that circuits over SAE features can be found in a large attribution graph by coarsening it
spectrally into a hierarchy of supernodes and searching it coarse to fine. Its authors' own audit of their code
finds the claims unsupported (one 10-node circuit on GPT-2 that controls match), so here it is a pipeline to test,
not a validated method: :func:`compare_with_controls` puts every HAGD circuit beside the greedy circuit (the top
features by |attribution|), random circuits and the empty circuit, at equal size, and docs/circuits.md reports the
outcome on the embedded model.

1. **Graph**: the ``graph_nodes`` features with the largest |node effect| (attribution patching) and the edges among
   them (:mod:`saeforge.circuits.edges`, summed over positions). Error nodes are not in the graph: every circuit,
   HAGD's and the controls', keeps all of them, so that faithfulness compares the features.
2. **Spectral coarsening** (:func:`coarsen`): with A = ½(|W| + |W|ᵀ) and the normalised Laplacian
   L = I − D^{-½} A D^{-½}, a group of nodes is split into ``branching`` parts by k-means on the rows (normalised to
   unit length) of the eigenvectors of its ``branching`` smallest eigenvalues, and each part is split again, down to
   parts of at most ``branching`` nodes. Each level of the tree is a coarsened graph: supernodes (the parts) joined
   by the summed weights between them (:meth:`Hierarchy.coarse_graph`). The paper builds the same tree bottom-up;
   top-down needs only ``branching`` eigenvectors per split.
3. **Coarse-to-fine search** (:func:`search`): from the root, the children of the kept supernodes are ranked by the
   mean score of their members and the best are kept (at least ``beam``, and as many as cover the circuit size),
   level after level, down to the last level above single nodes; among the members of the supernodes kept there,
   the circuit is grown as a connected region from the best node, adding the best-scoring neighbour each time (and
   the best remaining members if the region runs out). The
   score of a node is its |attribution| to the metric; the paper learns it with a graph network trained on ablation
   labels — which are the ablations later used to validate it, so that step is left out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from saeforge.errors import SaeforgeError


# ------------------------------------------------------------------------------------------------- coarsening
@dataclass
class Hierarchy:
    """A tree of supernodes over ``n`` graph nodes: ``children[s]`` are the supernodes a supernode splits into
    (empty for a leaf), ``members[s]`` its graph nodes; supernode 0 is the root (every node)."""

    members: list[list[int]]
    children: list[list[int]]
    depth: list[int]

    def level(self, d: int) -> list[list[int]]:
        """The partition of the nodes at depth ``d``: the supernodes there, and the leaves above it."""
        out, stack = [], [0]
        while stack:
            s = stack.pop()
            if self.depth[s] == d or not self.children[s]:
                out.append(sorted(self.members[s]))
            else:
                stack += self.children[s]
        return sorted(out)

    @property
    def levels(self) -> int:
        return max(self.depth) + 1

    def coarse_graph(self, weights: torch.Tensor, d: int) -> torch.Tensor:
        """``[k, k]`` summed |weights| between the supernodes of depth ``d`` (:meth:`level` order)."""
        parts = self.level(d)
        assign = torch.zeros(len(parts), weights.shape[0], dtype=torch.float64)
        for k, part in enumerate(parts):
            assign[k, part] = 1.0
        return assign @ weights.abs().double() @ assign.T


def _kmeans(x: torch.Tensor, k: int, seed: int, restarts: int = 8) -> torch.Tensor:
    """Labels of k-means (k-means++ starts, the best of ``restarts`` by distortion; scipy)."""
    import warnings

    import numpy as np

    try:
        from scipy.cluster.vq import kmeans2
    except ImportError as err:  # pragma: no cover - scipy comes with the dev, flow and circuits extras
        raise SaeforgeError("the hierarchical decomposition (HAGD) needs scipy",
                            "pip install 'saeforge[circuits]' (or scipy)") from err

    data = x.double().numpy()
    best, best_cost = None, float("inf")
    for r in range(restarts):
        with warnings.catch_warnings():  # an empty cluster in one restart: the other restarts cover it
            warnings.simplefilter("ignore", UserWarning)
            centres, labels = kmeans2(data, k, minit="++", seed=np.random.default_rng(seed + r))
        cost = float(((data - centres[labels]) ** 2).sum())
        if cost < best_cost and len(set(labels.tolist())) > 1:
            best, best_cost = labels, cost
    return torch.as_tensor(best if best is not None else labels, dtype=torch.long)


def spectral_split(weights: torch.Tensor, parts: int, *, seed: int = 0) -> torch.Tensor:
    """``[n]`` labels in ``0..parts-1``: k-means on the unit-normalised rows of the eigenvectors of the ``parts``
    smallest eigenvalues of the normalised Laplacian of A = ½(|W| + |W|ᵀ)."""
    n = weights.shape[0]
    if n <= parts:
        return torch.arange(n)
    a = 0.5 * (weights.abs() + weights.abs().T).double()
    a.fill_diagonal_(0.0)
    degree = a.sum(1)
    inv_sqrt = torch.where(degree > 0, degree.clamp(min=1e-300).rsqrt(), torch.zeros_like(degree))
    laplacian = torch.eye(n, dtype=torch.float64) - inv_sqrt[:, None] * a * inv_sqrt[None, :]
    _, vectors = torch.linalg.eigh(laplacian)
    embedding = vectors[:, :parts]
    embedding = embedding / embedding.norm(dim=1, keepdim=True).clamp(min=1e-12)
    labels = _kmeans(embedding, parts, seed)
    return torch.unique(labels, return_inverse=True)[1]  # 0..k-1 without gaps


def coarsen(weights: torch.Tensor, *, branching: int = 4, seed: int = 0) -> Hierarchy:
    """The hierarchy of :func:`spectral_split` applied from the root down to parts of at most ``branching`` nodes
    (module docstring). ``weights`` is ``[n, n]``, any sign, any direction."""
    if branching < 2:
        raise SaeforgeError(f"the branching factor must be at least 2, not {branching}", "pass --branching 4")
    n = weights.shape[0]
    members, children, depth = [list(range(n))], [[]], [0]
    stack = [0]
    while stack:
        s = stack.pop()
        nodes = members[s]
        if len(nodes) <= branching:
            if len(nodes) > 1:  # the leaves are single nodes
                for v in nodes:
                    children[s].append(len(members))
                    members.append([v])
                    children.append([])
                    depth.append(depth[s] + 1)
            continue
        sub = weights[nodes][:, nodes]
        labels = spectral_split(sub, branching, seed=seed)
        if int(labels.max()) == 0:  # k-means put everything together: split by order instead
            labels = torch.arange(len(nodes)) * branching // len(nodes)
        for k in range(int(labels.max()) + 1):
            part = [nodes[i] for i in (labels == k).nonzero().flatten().tolist()]
            children[s].append(len(members))
            members.append(part)
            children.append([])
            depth.append(depth[s] + 1)
            stack.append(len(members) - 1)
    return Hierarchy(members, children, depth)


# ------------------------------------------------------------------------------------------------- search
@dataclass
class SearchResult:
    nodes: list[int]
    """The circuit's graph nodes (indices into the graph), best first."""
    path: list[list[int]] = field(default_factory=list)
    """The supernodes kept at each level of the descent."""
    connected: bool = True
    """Whether the circuit is one connected region of the graph (otherwise it was filled from the kept members)."""


def search(hierarchy: Hierarchy, weights: torch.Tensor, scores: torch.Tensor, size: int, *, beam: int = 2,
           edge_threshold: float = 0.0) -> SearchResult:
    """A circuit of ``size`` graph nodes found coarse to fine (module docstring). ``scores`` ``[n]`` ≥ 0 (larger is
    more important); edges with |weight| > ``edge_threshold`` connect."""
    n = len(scores)
    if not 1 <= size <= n:
        raise SaeforgeError(f"a circuit of {size} nodes cannot be found in a graph of {n}",
                            f"pass a size between 1 and {n}")
    frontier, path = [0], []
    while True:
        candidates = [c for s in frontier for c in (hierarchy.children[s] or [s])]
        if all(len(hierarchy.members[c]) == 1 for c in candidates):  # the next level is single nodes: stop here
            break
        candidates.sort(key=lambda s: -float(scores[hierarchy.members[s]].mean()))
        kept, covered = [], 0
        for s in candidates:
            if len(kept) >= beam and covered >= size:
                break
            kept.append(s)
            covered += len(hierarchy.members[s])
        frontier = kept
        path.append(list(kept))
    pool = sorted({v for s in frontier for v in hierarchy.members[s]}, key=lambda v: -float(scores[v]))
    linked = (weights.abs() > edge_threshold) | (weights.abs() > edge_threshold).T
    chosen, in_pool = [pool[0]], set(pool)
    connected = True
    while len(chosen) < size:
        taken = set(chosen)
        reach = linked[chosen].any(0).nonzero().flatten().tolist()
        neighbours = [v for v in reach if v in in_pool and v not in taken]
        if not neighbours:
            connected = False
            neighbours = [v for v in pool if v not in taken]
        chosen.append(max(neighbours, key=lambda v: float(scores[v])))
    return SearchResult(chosen, path, connected)


# ------------------------------------------------------------------------------------------------- on a model
@dataclass
class AttributionGraph:
    """Features of several sites with their node effects and the edges among them."""

    nodes: list[tuple[str, int]]
    """(site, feature) of each graph node."""
    effects: torch.Tensor
    """``[n]`` node effects (attribution patching, summed over positions)."""
    weights: torch.Tensor
    """``[n, n]`` edge effects, ``weights[u, d]`` from node u to node d (zero where no direct path)."""
    seconds: dict[str, float] = field(default_factory=dict)

    def as_sites(self, chosen: Sequence[int]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for k in chosen:
            site, i = self.nodes[k]
            out.setdefault(site, []).append(i)
        return {s: sorted(v) for s, v in out.items()}


def attribution_graph(lm, enc, saes, effects, *, graph_nodes: int = 300, batch_size: int = 16,
                      progress: bool = False) -> AttributionGraph:
    """The graph of the ``graph_nodes`` features with the largest |effect| in ``effects`` (a
    :class:`~saeforge.circuits.attribution.NodeEffects` over ``saes``) and the edges among them."""
    from saeforge.circuits.circuit import select_nodes
    from saeforge.circuits.edges import attribute_edges

    nodes = select_nodes(effects, top=graph_nodes, errors=False)
    order = [(s, i) for s in effects.sites for i in nodes[s]]
    index = {node: k for k, node in enumerate(order)}
    summed = {s: (v.sum(0) if v.dim() == 2 else v) for s, v in effects.effects.items()}
    t0 = time.perf_counter()
    edges = attribute_edges(lm, enc, saes, nodes, batch_size=batch_size, progress=progress)
    weights = torch.zeros(len(order), len(order), dtype=torch.float64)
    for (up, down), w in edges.items():
        rows = [index[(down, j)] for j in nodes[down]]
        cols = [index[(up, i)] for i in nodes[up]]
        weights[torch.tensor(cols)[None, :], torch.tensor(rows)[:, None]] = w.double()
    return AttributionGraph(order, torch.tensor([float(summed[s][i]) for s, i in order]), weights,
                            {"edges": time.perf_counter() - t0})


def compare_with_controls(evaluator, graph: AttributionGraph, hierarchy: Hierarchy, sizes: Sequence[int], *,
                          beam: int = 2, random_draws: int = 5, seed: int = 0) -> list[dict[str, Any]]:
    """For each size: faithfulness and completeness (mean ablation, every error node kept) of the HAGD circuit, the
    greedy circuit (the top features of the graph by |attribution|), random circuits (as many active features per
    site as HAGD's), and the empty circuit (every feature ablated); and the overlap of HAGD's and greedy's."""
    from saeforge.circuits.lasso import overlap

    errors = {c.site: [c.d_sae] for c in evaluator.saes}

    def with_errors(nodes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
        return {s: sorted(nodes.get(s, [])) + e for s, e in errors.items()}

    scores = graph.effects.abs()
    empty = evaluator.faithfulness(errors)
    rows = []
    for size in sizes:
        found = search(hierarchy, graph.weights, scores, size, beam=beam)
        hagd = graph.as_sites(found.nodes)
        greedy = graph.as_sites(sorted(range(len(scores)), key=lambda k: -float(scores[k]))[:size])
        mine = evaluator.evaluate(with_errors(hagd), random_draws=random_draws, seed=seed)
        theirs = evaluator.evaluate(with_errors(greedy), random_draws=0)
        rows.append({"size": size, "hagd": mine["faithfulness"], "hagd_completeness": mine["completeness"],
                     "greedy": theirs["faithfulness"], "greedy_completeness": theirs["completeness"],
                     "random_mean": mine["random_faithfulness_mean"], "random_std": mine["random_faithfulness_std"],
                     "empty": empty, "connected": found.connected, "levels_descended": len(found.path),
                     "overlap_with_greedy": overlap(hagd, greedy), "nodes": hagd})
    return rows


def plot_comparison(rows: Sequence[Mapping[str, Any]], path, *, title: str = ""):
    """Faithfulness against circuit size for HAGD and its controls."""
    from saeforge.circuits.circuit import _random_band, plot_faithfulness

    return plot_faithfulness(path, [r["size"] for r in rows],
                             [([r["hagd"] for r in rows], "o-", "HAGD (coarse-to-fine search)"),
                              ([r["greedy"] for r in rows], "s--", "greedy (top |attribution|)")],
                             random=_random_band(rows, "random_mean", "random_std"),
                             lines_at=[(rows[0]["empty"], "-.", "no features (error nodes only)")] if rows else [],
                             xlabel="features in the circuit (every error node kept)", title=title)
