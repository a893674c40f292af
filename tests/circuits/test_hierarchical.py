"""HAGD's spectral coarsening and coarse-to-fine search on graphs with a planted answer, and its pipeline with
controls on the tiny model."""

import pytest
import torch

from saeforge.circuits.hierarchical import coarsen, search, spectral_split
from saeforge.errors import SaeforgeError


def planted(seed: int, blocks=4, sub_blocks=4, size=5, inside=1.0, between_subs=0.1, between_blocks=0.005):
    """A directed graph of ``blocks`` blocks of ``sub_blocks`` sub-blocks of ``size`` nodes, weights of random sign
    and magnitude falling with the distance in the planted tree, nodes shuffled. Returns (weights, [[block's
    sub-blocks as node sets]])."""
    g = torch.Generator().manual_seed(seed)
    n = blocks * sub_blocks * size
    order = torch.randperm(n, generator=g)
    label = torch.arange(n) // size  # sub-block of each position before shuffling
    scale = torch.full((n, n), between_blocks, dtype=torch.float64)
    same_block = (label[:, None] // sub_blocks) == (label[None, :] // sub_blocks)
    scale[same_block] = between_subs
    scale[label[:, None] == label[None, :]] = inside
    w = scale * (0.5 + torch.rand(n, n, generator=g, dtype=torch.float64))
    w = w * torch.where(torch.rand(n, n, generator=g) < 0.5, -1.0, 1.0).double()
    w = w * (torch.rand(n, n, generator=g) < 0.7)  # not every pair is joined
    weights = torch.zeros(n, n, dtype=torch.float64)
    weights[order[:, None], order[None, :]] = w  # node order[i] is planted position i
    tree = [[sorted(order[(label == b * sub_blocks + s)].tolist()) for s in range(sub_blocks)] for b in range(blocks)]
    return weights, tree


@pytest.mark.parametrize("seed", range(12))
def test_coarsening_finds_the_planted_blocks_and_sub_blocks(seed):
    weights, tree = planted(seed)
    hierarchy = coarsen(weights, branching=4, seed=seed)
    assert hierarchy.level(1) == sorted(sorted(v for sub in block for v in sub) for block in tree)
    assert hierarchy.level(2) == sorted(sub for block in tree for sub in block)
    assert hierarchy.levels == 5  # root, blocks, sub-blocks, their parts (5 > branching 4), single nodes
    leaves = [m for m, c in zip(hierarchy.members, hierarchy.children) if not c]
    assert sorted(v for m in leaves for v in m) == list(range(weights.shape[0])) and all(len(m) == 1 for m in leaves)
    coarse = hierarchy.coarse_graph(weights, 1)
    assert coarse.shape == (4, 4)
    assert float(coarse.sum()) == pytest.approx(float(weights.abs().sum()), rel=1e-12)
    assert float(coarse.diagonal().min()) > 10 * float((coarse - torch.diag(coarse.diagonal())).max())


def test_a_split_of_two_components_is_the_components():
    g = torch.Generator().manual_seed(0)
    w = torch.zeros(30, 30, dtype=torch.float64)
    w[:12, :12] = torch.rand(12, 12, generator=g, dtype=torch.float64)
    w[12:, 12:] = torch.rand(18, 18, generator=g, dtype=torch.float64)
    labels = spectral_split(w, 2)
    assert len(set(labels[:12].tolist())) == 1 and len(set(labels[12:].tolist())) == 1 and labels[0] != labels[12]


@pytest.mark.parametrize("seed", range(8))
def test_search_descends_into_the_planted_sub_block(seed):
    """Scores are high on one sub-block and low elsewhere, except one outlier of the highest score in a block of low
    mean: the search returns the sub-block (connected), where the top nodes by score would take the outlier."""
    weights, tree = planted(seed)
    g = torch.Generator().manual_seed(100 + seed)
    scores = 0.2 + 0.2 * torch.rand(weights.shape[0], generator=g, dtype=torch.float64)
    target = tree[1][2]
    scores[target] = 2.0 + torch.rand(len(target), generator=g, dtype=torch.float64)
    low_block = [v for sub in tree[3] for v in sub]
    scores[low_block] = 0.05
    outlier = tree[3][0][0]
    scores[outlier] = 3.5  # above every target node, but its block's mean (0.22) stays below the others' (≈ 0.3)
    hierarchy = coarsen(weights, branching=4, seed=seed)
    found = search(hierarchy, weights, scores, len(target), beam=2)
    assert sorted(found.nodes) == target and found.connected
    assert found.nodes[0] == max(target, key=lambda v: float(scores[v]))
    greedy = sorted(range(len(scores)), key=lambda v: -float(scores[v]))[: len(target)]
    assert outlier in greedy
    assert len(found.path) == 3  # blocks, sub-blocks, parts of sub-blocks


def test_search_fills_from_the_kept_members_when_the_region_runs_out():
    w = torch.zeros(8, 8, dtype=torch.float64)
    w[0, 1] = w[2, 3] = 1.0  # two separate pairs
    hierarchy = coarsen(w, branching=4)
    scores = torch.tensor([4.0, 3.0, 2.0, 1.0, 0, 0, 0, 0], dtype=torch.float64)
    found = search(hierarchy, w, scores, 3, beam=1)
    assert found.nodes[:2] == [0, 1] and not found.connected
    with pytest.raises(SaeforgeError, match="cannot be found in a graph of 8"):
        search(hierarchy, w, scores, 9)
    with pytest.raises(SaeforgeError, match="branching factor"):
        coarsen(w, branching=1)


def test_pipeline_with_controls_on_the_tiny_model(tiny_model_dirs):
    from saeforge.circuits.attribution import attribute_nodes, circuit_saes
    from saeforge.circuits.circuit import Evaluator
    from saeforge.circuits.edges import attribute_edges
    from saeforge.circuits.hierarchical import attribution_graph, compare_with_controls
    from tests.circuits.test_attribution import random_task
    from tests.models.test_gradients import _sae, float64_model

    lm = float64_model(tiny_model_dirs["llama"], "llama")
    sites = ("layers.0.mlp_out", "layers.1.attn_out", "layers.1.mlp_out")
    saes = circuit_saes(lm, {s: _sae(seed=i) for i, s in enumerate(sites)})
    enc = random_task(lm, n=4)
    effects = attribute_nodes(lm, enc, saes, method="atp")
    moving = sorted(abs(e) for s, i, e in effects.ranked() if i != effects.d_sae(s) and e != 0)
    assert len(moving) >= 12
    graph = attribution_graph(lm, enc, saes, effects, graph_nodes=12)
    assert len(graph.nodes) == 12
    assert sorted(graph.effects.abs().tolist()) == pytest.approx(moving[-12:], rel=1e-6)
    # the weights are the edges between the graph's nodes, from u to d
    nodes = graph.as_sites(range(len(graph.nodes)))
    edges = attribute_edges(lm, enc, saes, nodes)
    (up, down), w = next(iter(edges.items()))
    u, d = graph.nodes.index((up, nodes[up][0])), graph.nodes.index((down, nodes[down][0]))
    assert float(graph.weights[u, d]) == pytest.approx(float(w[0, 0]), rel=1e-6, abs=1e-12)
    assert float(graph.weights.abs().sum()) > 0

    evaluator = Evaluator(lm, enc, saes)
    rows = compare_with_controls(evaluator, graph, coarsen(graph.weights), [3, 6], random_draws=2)
    for row, size in zip(rows, (3, 6)):
        assert sum(len(v) for v in row["nodes"].values()) == size
        assert row["overlap_with_greedy"]["a"] == size == row["overlap_with_greedy"]["b"]
        assert row["random_std"] is not None and row["empty"] == rows[0]["empty"]
    errors_only = {c.site: [c.d_sae] for c in saes}
    assert rows[0]["empty"] == pytest.approx(evaluator.faithfulness(errors_only))
