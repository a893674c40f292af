"""Synthetic hierarchical data, the edge-recovery score, and the ground-truth comparison: HSAE against the post-hoc
baseline on data whose tree is known."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.hierarchy import FeatureTree, link_saes, tree_metrics
from saeforge.hierarchy.synthetic import HierarchicalFeatureModel, edge_recovery, jaccard_matches
from saeforge.saes.hsae import HSAEConfig
from saeforge.training import TrainConfig, train_on_arrays


def test_children_fire_only_with_their_parent_and_lean_towards_it():
    truth = HierarchicalFeatureModel.create(d=32, n_roots=8, branching=(3, 2), mean_active_roots=2.0,
                                            child_probability=0.6, child_similarity=0.5, seed=1)
    assert truth.widths == [8, 24, 48]
    x, active = truth.sample(20_000, seed=2)
    assert x.shape == (20_000, 32)
    for depth, parent in enumerate(truth.parents, start=1):
        child, above = active[depth], active[depth - 1]
        assert not bool((child & ~above[:, parent]).any())           # never without the parent
        assert int(child.view(20_000, -1, parent.numel() // above.shape[1]).sum(-1).max()) <= 1  # one child at most
        rate = float(child.float().sum() / above.float().sum())  # ≈ child_probability per active parent
        assert rate == pytest.approx(0.6, abs=0.03)
        cos = (truth.directions[depth] * truth.directions[depth - 1][parent]).sum(1)
        assert torch.allclose(cos, torch.full_like(cos, 0.5), atol=1e-5)
    assert float(active[0].float().sum(1).mean()) == pytest.approx(2.0, abs=0.05)


def test_bad_generator_settings():
    with pytest.raises(SaeforgeError, match="branching"):
        HierarchicalFeatureModel.create(branching=(0,))
    with pytest.raises(SaeforgeError, match="mean_active_roots"):
        HierarchicalFeatureModel.create(n_roots=4, mean_active_roots=5)


def test_edge_recovery_of_the_true_tree_and_of_a_wrong_one():
    truth = HierarchicalFeatureModel.create(d=16, n_roots=6, branching=(3,), seed=0)
    _, active = truth.sample(5000, seed=1)
    perfect = FeatureTree("posthoc", _levels([6, 18]), [truth.parents[0].numpy()])
    assert edge_recovery(perfect, active, truth, active)["edge_recovery"] == 1.0
    shifted = FeatureTree("posthoc", _levels([6, 18]), [((truth.parents[0] + 1) % 6).numpy()])
    assert edge_recovery(shifted, active, truth, active)["edge_recovery"] == 0.0
    idx, best = jaccard_matches(active[1], active[1])
    assert idx.tolist() == list(range(18)) and bool((best == 1).all())


def _levels(widths):
    from saeforge.hierarchy.tree import TreeLevel

    return [TreeLevel(f"level_{i}", "x", (0, w)) for i, w in enumerate(widths)]


def _train_and_score(tmp_path, seed: int, options: dict | None = None) -> dict:
    """Train an HSAE (16 / 64) and two single-level SAEs on one synthetic data set; ``options``: HSAE options for
    all three (benchmarks/hierarchy_ground_truth.py --options)."""
    options = options or {}
    truth = HierarchicalFeatureModel.create(d=64, n_roots=16, branching=(4,), mean_active_roots=2.0, seed=seed)
    x, _ = truth.sample(200_000, seed=seed + 1)
    held, held_active = truth.sample(20_000, seed=seed + 2)
    targets = [2.0, 3.6]  # the true L0 of the roots, and of roots and children together
    lr = HSAEConfig.default_lr(16 + 64)  # one learning rate for all, so only the training objective differs
    saes = ({"site": "s", "name": "hsae",
             "sae_options": json.dumps({**options, "level_sizes": [16, 64], "target_l0": targets})},
            {"site": "s", "name": "w16",
             "sae_options": json.dumps({**options, "level_sizes": [16], "target_l0": targets[:1]})},
            {"site": "s", "name": "w64",
             "sae_options": json.dumps({**options, "level_sizes": [64], "target_l0": targets[1:]})})
    out = tmp_path / f"seed{seed}"
    train_on_arrays({"s": x}, TrainConfig(out=str(out), tokens=600_000, batch_size=1024, architecture="hsae", lr=lr,
                                          seed=seed, progress=False, device="cpu", saes=saes))
    trees = {"hsae": FeatureTree.load(out / "saes" / "hsae"),
             "posthoc": link_saes([out / "saes" / "w16", out / "saes" / "w64"], tree_folder=out)}
    scores = {}
    for name, tree in trees.items():
        levels = tree.load_levels()
        summary = tree_metrics(tree, [held[i:i + 4096] for i in range(0, len(held), 4096)], levels=levels).summary()
        with torch.no_grad():
            active = [sae.encode(held)[:, sl] > 0 for sae, sl in levels]
        scores[name] = {**summary, **edge_recovery(tree, active, truth, held_active)}
    return scores


SEEDS = 12  # independent data sets and trainings, about 12 s each on a quiet 2-core machine


@pytest.mark.slow
def test_hsae_recovers_the_true_tree_as_well_as_the_post_hoc_baseline(tmp_path):
    """Twelve independent data sets and trainings, pooled: at the same L0 and about the same reconstruction, both
    trees hold far more of the 64 true edges than chance (1/16), and HSAE's tree is not worse than the post-hoc
    tree of independently trained SAEs.

    What is measured (docs/hierarchy.md, "Ground truth", 20 seeds): HSAE 0.524, post-hoc 0.498 edge recovery, a gap
    of +0.027 whose standard error is 0.021 (per-seed differences spread by 0.092, mostly the luck of 64 edges): HSAE
    is *not* measurably better at this budget (586 steps, the paper's ρ = 0.01), so that is not asserted. Over
    twelve seeds the means' standard errors are about 0.022 each and 0.027 for the gap: the floor of 0.40 for both
    (measured 0.52 / 0.50) is five of them below; the defaults before the λ fix gave 0.34 / 0.47 on seed 0, and a
    fast λ controller silenced level 0 (0.06). HSAE at most 0.05 behind is 2.9 of them below the measured gap."""
    runs = []
    for seed in range(SEEDS):
        runs.append(_train_and_score(tmp_path, seed))
        shutil.rmtree(tmp_path / f"seed{seed}")  # 50 MB of activations each

    def mean(method, key):
        return sum(r[method][key] for r in runs) / len(runs)

    for r in runs:  # matched: both reach the target L0 of each level, and reconstruct about as well
        for method in ("hsae", "posthoc"):
            for level, target in zip(r[method]["levels"], (2.0, 3.6)):
                assert level["l0"] == pytest.approx(target, rel=0.15)
        for a, b in zip(r["hsae"]["levels"], r["posthoc"]["levels"]):
            assert a["fvu"] <= 1.3 * b["fvu"] + 0.005
    hsae, posthoc = mean("hsae", "edge_recovery"), mean("posthoc", "edge_recovery")
    assert hsae >= 0.40 and posthoc >= 0.40
    assert hsae >= posthoc - 0.05
