"""Synthetic hierarchical data, the edge-recovery score, and the ground-truth comparison: HSAE against the post-hoc
baseline on data whose tree is known."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

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


def test_a_child_can_stand_in_for_its_parent_and_be_weaker():
    """parent_with_child 0: on a sample where a child fires, its parent adds nothing of its own (x is the child's
    direction, which leans towards the parent's); child_scale: children's magnitudes are that multiple of the
    roots'. The firing is the default's, draw for draw."""
    kw = dict(d=16, n_roots=4, branching=(3,), mean_active_roots=1.0, child_probability=0.5, seed=3)
    plain = HierarchicalFeatureModel.create(**kw)
    split = HierarchicalFeatureModel.create(**kw, parent_with_child=0.0, child_scale=0.25)
    x0, active0 = plain.sample(4000, seed=4)
    x1, active1 = split.sample(4000, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(active0, active1))
    roots, children = active1
    one_root = roots.sum(1) == 1
    has_child = children.any(1)
    for i in torch.nonzero(one_root).flatten()[:300].tolist():
        if bool(has_child[i]):  # only the child's direction
            c = int(torch.nonzero(children[i])[0])
            assert float(x1[i] @ split.directions[1][c] / x1[i].norm()) == pytest.approx(1.0, abs=1e-5)
        else:                   # a root alone: as before
            assert torch.allclose(x1[i], x0[i], atol=1e-6)
    ratio = x1[one_root & has_child].norm(dim=1).median() / x1[one_root & ~has_child].norm(dim=1).median()
    assert float(ratio) == pytest.approx(0.25, rel=0.1)
    with pytest.raises(SaeforgeError, match="parent_with_child"):
        HierarchicalFeatureModel.create(parent_with_child=1.5)
    with pytest.raises(SaeforgeError, match="child_scale"):
        HierarchicalFeatureModel.create(child_scale=0)


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


def test_a_level_that_copies_the_roots_recovers_no_edge_one_to_one():
    """A finer level of 18 latents whose first 6 fire exactly with the roots (copies) and whose others never fire,
    linked to the right roots: matched to its best latent each child picks its root's copy, so every edge looks
    recovered; one to one, the 12 children left over get silent latents and only the 6 that got a copy count."""
    truth = HierarchicalFeatureModel.create(d=16, n_roots=6, branching=(3,), seed=0)
    _, active = truth.sample(5000, seed=1)
    copies = torch.cat([active[0], torch.zeros(5000, 12, dtype=torch.bool)], dim=1)
    parents = torch.cat([torch.arange(6), torch.zeros(12, dtype=torch.long)])
    tree = FeatureTree("posthoc", _levels([6, 18]), [parents.numpy()])
    assert edge_recovery(tree, [active[0], copies], truth, active, one_to_one=False)["edge_recovery"] == 1.0
    one = edge_recovery(tree, [active[0], copies], truth, active)
    assert one["edge_recovery"] == 6 / 18
    idx, best = jaccard_matches(copies, active[1], one_to_one=True)
    assert int((idx >= 0).sum()) == 6 and len(set(idx[idx >= 0].tolist())) == 6 and bool((best[idx < 0] == 0).all())


def _levels(widths):
    from saeforge.hierarchy.tree import TreeLevel

    return [TreeLevel(f"level_{i}", "x", (0, w)) for i, w in enumerate(widths)]


# The ground-truth comparison's data and levels: the generator's options (HierarchicalFeatureModel.create), the
# level widths and each level's target L0 (the true L0 of the roots, and of roots and children together).
DEFAULT_REGIME = {"truth": {"d": 64, "n_roots": 16, "branching": [4], "mean_active_roots": 2.0},
                  "widths": [16, 64], "targets": [2.0, 3.6]}


def _train_and_score(tmp_path, seed: int, options: dict | None = None, tokens: int = 600_000,
                     regime: dict | None = None) -> dict:
    """Train an HSAE (16 / 64) and two single-level SAEs on one synthetic data set (``tokens`` samples each, passes
    over 200k); ``options``: HSAE options for all three (benchmarks/hierarchy_ground_truth.py --options);
    ``regime``: what to change in DEFAULT_REGIME (``truth`` options are merged into the default ones). The
    post-hoc tree uses the HSAE's assignment rule (``tree_similarity``, ``unassigned_fraction``); co-activation
    counted on the training data."""
    options = options or {}
    regime = {**DEFAULT_REGIME, **(regime or {}),
              "truth": {**DEFAULT_REGIME["truth"], **(regime or {}).get("truth", {})}}
    truth = HierarchicalFeatureModel.create(**regime["truth"], seed=seed)
    x, _ = truth.sample(200_000, seed=seed + 1)
    held, held_active = truth.sample(20_000, seed=seed + 2)
    widths, targets = list(regime["widths"]), list(regime["targets"])
    lr = HSAEConfig.default_lr(sum(widths))  # one learning rate for all, so only the training objective differs
    saes = ({"site": "s", "name": "hsae",
             "sae_options": json.dumps({**options, "level_sizes": widths, "target_l0": targets})},
            *({"site": "s", "name": f"w{w}", "sae_options": json.dumps({**options, "level_sizes": [w],
                                                                           "target_l0": [t]})}
              for w, t in zip(widths, targets)))
    out = tmp_path / f"seed{seed}"
    train_on_arrays({"s": x}, TrainConfig(out=str(out), tokens=tokens, batch_size=1024, architecture="hsae", lr=lr,
                                          seed=seed, progress=False, device="cpu", saes=saes))
    posthoc = [out / "saes" / f"w{w}" for w in widths]
    batches = [x[i:i + 8192] for i in range(0, len(x), 8192)]
    rule = options.get("tree_similarity", "encoder")
    unassigned = options.get("unassigned_fraction", 0.2)
    trees = {"hsae": FeatureTree.load(out / "saes" / "hsae"),
             "posthoc": link_saes(posthoc, tree_folder=out, similarity=rule, unassigned_fraction=unassigned,
                                  activations=batches)}
    if rule != "coactivation":  # the same independent SAEs linked by co-firing: the two rules compared
        trees["posthoc_coactivation"] = link_saes(posthoc, tree_folder=out, similarity="coactivation",
                                                  unassigned_fraction=unassigned, activations=batches)
    scores = {}
    for name, tree in trees.items():
        levels = tree.load_levels()
        summary = tree_metrics(tree, [held[i:i + 4096] for i in range(0, len(held), 4096)], levels=levels).summary()
        with torch.no_grad():
            active = [sae.encode(held)[:, sl] > 0 for sae, sl in levels]
        best_match = edge_recovery(tree, active, truth, held_active, one_to_one=False)
        scores[name] = {**summary, **edge_recovery(tree, active, truth, held_active),
                        "edge_recovery_best_match": best_match["edge_recovery"]}
    return scores


def _score_seed(folder: str, seed: int, options: dict | None = None, threads: int = 1, tokens: int = 600_000,
                regime: dict | None = None) -> dict:
    """_train_and_score in ``folder`` on ``threads`` threads, its activations removed afterwards."""
    torch.set_num_threads(threads)
    scores = _train_and_score(Path(folder), seed, options, tokens, regime)
    shutil.rmtree(Path(folder) / f"seed{seed}", ignore_errors=True)  # 50 MB of activations
    return scores


def _score_seeds(folder, seeds, options: dict | None = None, jobs: int = 2, tokens: int = 600_000,
                 regime: dict | None = None):
    """_score_seed for every seed in order (a generator), ``jobs`` at once (one thread each; spawned, as forking a
    process whose OpenMP threads already ran can hang). The scores do not depend on ``jobs``."""
    if jobs <= 1:
        yield from (_score_seed(str(folder), s, options, 1, tokens, regime) for s in seeds)
        return
    n = len(seeds)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_score_seed, [str(folder)] * n, seeds, [options] * n, [1] * n, [tokens] * n,
                            [regime] * n)


SEEDS = 30  # independent data sets and trainings, about 12 s each on one thread of a quiet machine, two at once
# HSAE − post-hoc edge recovery (one to one): mean and per-seed spread over seeds 0–29 (docs/hierarchy.md)
MEASURED_GAP, GAP_SD = 0.0208, 0.0772
# The same post-hoc SAEs linked by co-firing − by encoder cosine: mean and per-seed spread over seeds 0–29
RULE_GAP, RULE_SD = 0.2198, 0.0484


@pytest.mark.slow
def test_hsae_recovers_the_true_tree_as_well_as_the_post_hoc_baseline(tmp_path):
    """Thirty independent data sets and trainings, paired: at the same L0 and about the same reconstruction, both
    trees hold far more of the 64 true edges than chance (1/16), and HSAE's tree is not behind the post-hoc tree of
    independently trained SAEs of the same widths.

    Measured (30 seeds, docs/hierarchy.md, "Ground truth"): HSAE 0.400, post-hoc 0.379, a gap of
    MEASURED_GAP whose per-seed spread is GAP_SD — not measurably better, so "better" (issue 15, item 4) is not
    asserted. The mean gap over thirty seeds must stay above the measured gap minus three of its standard errors
    (-0.021). Both means at least 0.30: per-seed spread about 0.06, so more than five standard errors below the
    lower mean.

    The assignment rule matters more than the training: the same independent SAEs linked by co-firing
    (``tree_similarity="coactivation"``, P(parent | child) on the training data) recover RULE_GAP more of the true
    edges than linked by encoder cosine; the mean over thirty seeds must stay above RULE_GAP minus three of its
    standard errors."""
    runs = list(_score_seeds(tmp_path, list(range(SEEDS))))
    for r in runs:  # matched: both reach the target L0 of each level, and reconstruct about as well
        for method in ("hsae", "posthoc"):
            for level, target in zip(r[method]["levels"], (2.0, 3.6)):
                assert level["l0"] == pytest.approx(target, rel=0.15)
        for a, b in zip(r["hsae"]["levels"], r["posthoc"]["levels"]):
            assert a["fvu"] <= 1.3 * b["fvu"] + 0.005
    gaps = [r["hsae"]["edge_recovery"] - r["posthoc"]["edge_recovery"] for r in runs]
    hsae = sum(r["hsae"]["edge_recovery"] for r in runs) / SEEDS
    posthoc = sum(r["posthoc"]["edge_recovery"] for r in runs) / SEEDS
    assert hsae >= 0.30 and posthoc >= 0.30
    assert sum(gaps) / SEEDS >= MEASURED_GAP - 3 * GAP_SD / SEEDS**0.5, (hsae, posthoc, gaps)
    rule_gaps = [r["posthoc_coactivation"]["edge_recovery"] - r["posthoc"]["edge_recovery"] for r in runs]
    assert sum(rule_gaps) / SEEDS >= RULE_GAP - 3 * RULE_SD / SEEDS**0.5, rule_gaps
