"""Tree metrics against a direct count, for post-hoc, HSAE and Matryoshka trees."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saeforge.hierarchy import FeatureTree, link_saes, matryoshka_tree, tree_metrics
from saeforge.hierarchy.metrics import TreeMetrics
from saeforge.saes import save_sae

from .helpers import activations, random_hsae, random_jumprelu, random_matryoshka, saved


def _direct(tree, levels, x):
    """P(p|c), P(c|p) per pair and Hamming per parent, counted token by token in numpy."""
    acts = [(sae.encode(x)[:, sl] > 0).numpy() for sae, sl in levels]
    ppc, pcp, ham = [], [], []
    for lv in range(tree.n_levels - 1):
        par, child = tree.pairs(lv)
        for p, c in zip(par, child):
            a_p, a_c = acts[lv][:, p], acts[lv + 1][:, c]
            if a_c.sum():
                ppc.append((a_p & a_c).sum() / a_c.sum())
            if a_p.sum():
                pcp.append((a_p & a_c).sum() / a_p.sum())
        for p in np.unique(par):
            union = acts[lv + 1][:, child[par == p]].any(1)
            ham.append((acts[lv][:, p] != union).sum() * 1000 / x.shape[0])
    return np.mean(ppc), np.mean(pcp), np.mean(ham)


def _check(tree, x, levels=None):
    levels = levels or tree.load_levels()
    m = tree_metrics(tree, [x[i:i + 300] for i in range(0, len(x), 300)], levels=levels)
    s = m.summary()
    with torch.no_grad():
        ppc, pcp, ham = _direct(tree, levels, x)
    assert s["p_parent_given_child"] == pytest.approx(ppc, rel=1e-9)
    assert s["p_child_given_parent"] == pytest.approx(pcp, rel=1e-9)
    assert s["hamming_per_1k"] == pytest.approx(ham, rel=1e-9)
    assert s["tokens"] == len(x)
    return m, levels


def test_post_hoc_tree_metrics_match_a_direct_count(tmp_path):
    small, big = random_jumprelu(6, 0), random_jumprelu(20, 1)
    tree = link_saes([saved(small, tmp_path / "a"), saved(big, tmp_path / "b")])
    x = activations()
    m, _ = _check(tree, x)
    # per-level figures: L0 and the SAE's own FVU with the dataset-mean denominator
    with torch.no_grad():
        for row, sae in zip(m.summary()["levels"], (small, big)):
            f = sae.encode(x)
            assert row["l0"] == pytest.approx(float((f > 0).float().sum(1).mean()), rel=1e-6)
            fvu = float((sae.decode(f) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
            assert row["fvu"] == pytest.approx(fvu, rel=1e-5)
            assert row["dead_fraction"] == pytest.approx(float(((f > 0).sum(0) == 0).float().mean()))


def test_hsae_tree_uses_each_level_alone(tmp_path):
    hsae = random_hsae((6, 20))
    folder = save_sae(hsae, tmp_path / "h", metadata={"hook_name": "layers.1.resid_post"})
    tree = FeatureTree.load(folder)
    x = activations()
    m, levels = _check(tree, x)
    with torch.no_grad():
        f = hsae.encode(x)
        rec = hsae.level_reconstruction(f, 1)
    fvu = float((rec - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert m.levels[1]["fvu"] == pytest.approx(fvu, rel=1e-5)


def test_matryoshka_levels_reconstruct_with_their_prefix(tmp_path):
    sae = random_matryoshka((4, 12, 16))
    tree = matryoshka_tree(saved(sae, tmp_path / "m"))
    x = activations()
    m, _ = _check(tree, x)
    with torch.no_grad():
        f = sae.encode(x)
        prefix = f[:, :16] @ sae.W_dec[:16] + sae.b_dec
    assert m.levels[1]["fvu"] == pytest.approx(float((prefix - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()),
                                               rel=1e-5)


def test_metrics_round_trip_and_per_pair_lookup(tmp_path):
    tree = link_saes([saved(random_jumprelu(6, 0), tmp_path / "a"), saved(random_jumprelu(20, 1), tmp_path / "b")])
    m = tree_metrics(tree, [activations()])
    again = TreeMetrics.from_dict(m.to_dict())
    s1, s2 = m.summary(), again.summary()
    assert s1["p_parent_given_child"] == pytest.approx(s2["p_parent_given_child"], rel=1e-6)
    pair = m.pairs[0]
    child = int(pair.children[0])
    expected, got = pair.p_parent_given_child[0], pair.for_child(child)["p_parent_given_child"]
    assert got is None if math.isnan(expected) else got == pytest.approx(expected)  # None: the child never fired
    assert pair.for_parent(int(pair.hamming_parents[0])) == pytest.approx(pair.hamming_per_1k[0])
