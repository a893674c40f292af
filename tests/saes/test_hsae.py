"""HSAE: config rules, the structural loss and perturbation, the tree update, the adaptive sparsity coefficients,
levels as ordinary SAEs, saving with the tree, and training through the ordinary trainer (with exact resume)."""

from __future__ import annotations

import json

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.hierarchy.tree import FeatureTree
from saeforge.saes import HSAE, HSAEConfig, JumpReLUSAE, TrainState, load_sae, make_sae, save_sae
from saeforge.saes.hsae import (_TreeLayout, assign_by_score, assign_parents, coactivation_decay, default_level_sizes,
                                structure_loss)
from saeforge.training import TrainConfig, Trainer, train
from tests.conftest import TRAIN_SITES as SITES


def _hsae(levels=(4, 8, 20), d_in=12, seed=0, **kw) -> HSAE:
    torch.manual_seed(seed)
    sae = make_sae(HSAEConfig(d_in=d_in, d_sae=sum(levels), level_sizes=levels, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.copy_(0.2 * torch.randn(sae.cfg.d_sae, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(d_in, generator=g))
        theta = 0.1 + 0.3 * torch.rand(sae.cfg.d_sae, generator=g)
        sae.log_threshold.copy_(torch.log(theta) / sae.cfg.threshold_lr_scale)
    return sae


def _x(n=64, d=12, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2


# ---------------------------------------------------------------------------------------------------- config
def test_default_levels_double_and_fill_d_sae():
    assert default_level_sizes(4608) == (307, 614, 1228, 2459)
    assert default_level_sizes(60) == (4, 8, 16, 32)
    assert default_level_sizes(20) == (6, 14)  # too small for three levels of at least 4
    assert default_level_sizes(8) == (8,)
    cfg = HSAEConfig(d_in=8, d_sae=4608)
    assert cfg.level_sizes == (307, 614, 1228, 2459) and sum(cfg.level_sizes) == cfg.d_sae
    assert cfg.target_l0 == (38.0, 50.0, 50.0, 50.0)  # the paper's 50, at most a level's width / 8
    assert HSAEConfig(d_in=8, d_sae=60, target_l0=[2]).target_l0 == (2.0,) * 4


def test_level_sizes_given_set_d_sae_in_training_options():
    cfg = HSAEConfig.from_training_options(d_in=12, d_sae=96, k=32, sparsity_coefficient=-1, dead_after_tokens=10,
                                           options={"level_sizes": [16, 64]})
    assert cfg.d_sae == 80 and cfg.level_sizes == (16, 64)


@pytest.mark.parametrize("kw, message, fix", [
    ({"level_sizes": (8, 8, 16)}, "level widths must grow", "level_sizes"),
    ({"level_sizes": (16, 8)}, "level widths must grow", "[8, 16]"),
    ({"level_sizes": (8, 16), "d_sae": 30}, "add up to 24, but d_sae is 30", "--d-sae 24"),
    ({"level_sizes": (8, 16), "target_l0": (8, 4)}, "target L0 8 of level 0 is not below its width 8", "target_l0"),
    ({"level_sizes": (8, 16), "target_l0": (1, 2, 3)}, r"one per level \(2\)", "target_l0"),
    ({"level_sizes": (8, 16), "apply_b_dec_to_input": True}, "apply_b_dec_to_input must be false", "false"),
    ({"level_sizes": (8, 16), "tree_similarity": "cofiring"}, "unknown tree_similarity", "encoder"),
    ({"level_sizes": (8, 16), "perturbation_rate": 1.5}, "perturbation_rate must be", "0.05"),
    ({"level_sizes": (8, 16), "unassigned_fraction": 1.0}, "unassigned_fraction must be", "0.2"),
    ({"level_sizes": (8, 16), "l0_energy": "max"}, "l0_energy must be one of mean, median", "median"),
])
def test_bad_settings_are_refused_with_a_command_line_fix(kw, message, fix):
    kw = {"d_in": 4, "d_sae": sum(kw.get("level_sizes", ())), **kw}
    with pytest.raises(SaeforgeError, match=message) as err:
        HSAEConfig(**kw)
    assert "--" in err.value.fix and fix in err.value.fix


def test_config_round_trips():
    cfg = HSAEConfig(d_in=6, d_sae=24, level_sizes=[8, 16], target_l0=[2, 3], structure_coefficient=0.5)
    again = HSAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.level_slices == (slice(0, 8), slice(8, 24))


# ---------------------------------------------------------------------------------------------------- pieces
def _brute_structure(fp, fc, dp, dc, parents):
    total = torch.zeros(fp.shape[0], dtype=torch.float64)
    for i in range(fp.shape[1]):
        ch = torch.nonzero(parents == i).flatten()
        if ch.numel():
            v = fp[:, i:i + 1].double() * dp[i].double() - fc[:, ch].double() @ dc[ch].double()
            total += v.pow(2).sum(-1)
    return total.mean()


@pytest.mark.parametrize("big_group", [False, True])
def test_structure_loss_is_the_sum_of_parent_minus_children_squared(big_group):
    g = torch.Generator().manual_seed(3)
    fp = torch.rand(9, 6, generator=g)
    fc = torch.rand(9, 100, generator=g) * (torch.rand(9, 100, generator=g) < 0.4)
    dp, dc = torch.randn(6, 7, generator=g), torch.randn(100, 7, generator=g)
    parents = torch.randint(-1, 6, (100,), generator=g)
    if big_group:
        parents[:80] = 2  # a parent with more children than the sparse Gram path takes
    got = structure_loss(fp, fc, dp, dc, parents)
    assert float(got) == pytest.approx(float(_brute_structure(fp, fc, dp, dc, parents)), rel=1e-5)
    # and its gradients are those of the direct formula
    fp2, dc2 = fp.clone().requires_grad_(), dc.clone().requires_grad_()
    structure_loss(fp2, fc, dp, dc2, parents).backward()
    fp3, dc3 = fp.double().clone().requires_grad_(), dc.double().clone().requires_grad_()
    _brute_structure(fp3, fc, dp, dc3, parents).backward()
    torch.testing.assert_close(fp2.grad.double(), fp3.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dc2.grad.double(), dc3.grad, rtol=1e-4, atol=1e-5)


def test_structure_loss_is_zero_without_children_and_when_children_sum_to_the_parent():
    fp, fc = torch.rand(5, 3), torch.rand(5, 6)
    dp, dc = torch.randn(3, 4), torch.randn(6, 4)
    assert float(structure_loss(fp, fc, dp, dc, torch.full((6,), -1))) == 0.0
    parents = torch.tensor([0, 0, 1, -1, -1, -1])
    fc = torch.zeros(5, 6)
    fc[:, 0], fc[:, 1], fc[:, 2] = fp[:, 0], fp[:, 0], fp[:, 1]
    dc = dc.clone()
    dc[0], dc[1], dc[2] = 0.25 * dp[0], 0.75 * dp[0], dp[1]
    assert float(structure_loss(fp, fc, dp, dc, parents)) == pytest.approx(0.0, abs=1e-6)  # terms are O(1)


def test_assign_parents_takes_the_most_similar_and_leaves_the_least_similar_out():
    parents = torch.eye(4, 6)
    children = torch.tensor([[1.0, 0.1, 0, 0, 0, 0], [0, 0, 0, 2.0, 0, 0], [0, 1.0, 1.0, 0, 0, 0],
                             [0, 0, 0, 0, 1.0, 0], [0, 0, 0.2, 0, 0, 1.0]])
    index, best = assign_parents(children, parents, 0.0)
    assert index.tolist() == [0, 3, 1, 0, 2] and best[3] == 0.0 and best[1] == pytest.approx(1.0)
    index, _ = assign_parents(children, parents, 0.4)  # floor(0.4 * 5) = 2 children without a parent
    assert index.tolist() == [0, 3, 1, -1, -1]
    with pytest.raises(SaeforgeError, match="unassigned_fraction"):
        assign_parents(children, parents, 1.0)


def test_tree_update_uses_encoder_or_decoder_cosines():
    for rule in ("encoder", "decoder"):
        sae = _hsae(tree_similarity=rule, unassigned_fraction=0.25)
        sae.update_tree()
        for lv in (1, 2):
            vec = sae.level_vectors(lv)
            expected, _ = assign_parents(vec, sae.level_vectors(lv - 1), 0.25)
            assert torch.equal(sae.level_parents(lv), expected)
            assert int((sae.level_parents(lv) < 0).sum()) == int(0.25 * sae.cfg.level_sizes[lv])
        assert torch.equal(sae.parent_index[:4], torch.full((4,), -1)) and int(sae.tree_updates) == 1


def test_assign_by_score_takes_the_highest_score_and_leaves_the_lowest_out():
    score = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.5, 0.2], [0.0, 0.0, 0.0], [0.3, 0.0, 0.6]])
    index, best = assign_by_score(score, 0.0)
    assert index.tolist() == [1, 0, 0, 2] and best.tolist() == pytest.approx([0.9, 0.5, 0.0, 0.6])
    index, _ = assign_by_score(score, 0.5)  # floor(0.5 * 4) = 2: the never-co-firing child and the 0.5 one
    assert index.tolist() == [1, -1, -1, 2]
    with pytest.raises(SaeforgeError, match="unassigned_fraction"):
        assign_by_score(score, 1.0)
    with pytest.raises(SaeforgeError, match="score matrix"):
        assign_by_score(torch.zeros(4))


def test_coactivation_tree_follows_the_ema_of_co_firing(tmp_path):
    """With tree_similarity "coactivation" each child takes the latent one level up that fired with it most often,
    P(parent | child) from EMAs over the training batches: equal to the exact decay-weighted counts."""
    sae = _hsae(levels=(4, 8, 20), tree_similarity="coactivation", unassigned_fraction=0.25)
    assert sae.firing_ema.shape == (32,) and sae.coactivation_ema_2.shape == (20, 8)
    g = torch.Generator().manual_seed(5)
    decay = coactivation_decay(10)
    assert decay == pytest.approx(0.8) and coactivation_decay(5000) == 0.999 and coactivation_decay(1) == 0.5
    batches = [torch.rand(50, 32, generator=g) < 0.3 for _ in range(6)]
    for a in batches:
        sae._track_coactivation(a, decay)
    weights = [(1 - decay) * decay ** (len(batches) - 1 - t) for t in range(len(batches))]
    for lv, (child, parent) in ((1, (slice(4, 12), slice(0, 4))), (2, (slice(12, 32), slice(4, 12)))):
        both = sum(w * (a[:, child].T.double() @ a[:, parent].double()) / 50 for w, a in zip(weights, batches))
        fired = sum(w * a[:, child].double().mean(0) for w, a in zip(weights, batches))
        torch.testing.assert_close(sae.parent_given_child(lv), (both / fired[:, None]).float(), rtol=1e-5, atol=1e-6)
        sae.update_tree()
        expected, _ = assign_by_score(sae.parent_given_child(lv), 0.25)
        assert torch.equal(sae.level_parents(lv), expected)
    again = load_sae(save_sae(sae, tmp_path / "hsae"))  # the co-firing state travels with the weights
    assert torch.equal(again.coactivation_ema_2, sae.coactivation_ema_2)
    assert torch.equal(again.firing_ema, sae.firing_ema)


def test_coactivation_ema_is_fed_by_training_steps():
    sae = _hsae(levels=(4, 8), tree_similarity="coactivation", tree_update_every=2)
    opt = torch.optim.Adam(sae.parameters())
    x = _x()
    fired = sae.encode(x) > 0
    sae.training_loss(x, state=TrainState())
    sae.after_step(0, 10, torch.zeros(12, dtype=torch.bool), x, opt)
    decay = coactivation_decay(2)
    torch.testing.assert_close(sae.firing_ema, (1 - decay) * fired.float().mean(0))
    assert int(sae.tree_updates) == 0
    sae.training_loss(x, state=TrainState())
    sae.after_step(1, 10, torch.zeros(12, dtype=torch.bool), x, opt)  # step 2 of 10: the first tree
    assert int(sae.tree_updates) == 1
    expected, _ = assign_by_score(sae.parent_given_child(1), sae.cfg.unassigned_fraction)
    assert torch.equal(sae.level_parents(1), expected)
    assert not hasattr(_hsae(levels=(4, 8)), "firing_ema")  # the other rules carry no co-firing state


def test_training_loss_terms_before_and_after_the_first_tree():
    sae = _hsae()
    x = _x()
    out = sae.training_loss(x, state=TrainState(sparsity_scale=0.5))
    assert set(out.terms) == {f"{t}_level_{i}" for t in ("mse", "l0") for i in range(3)} | {"pre_act"}
    assert torch.allclose(out.loss, sum(out.terms.values()))
    f = sae.encode(x)
    torch.testing.assert_close(out.x_hat, sae.decode(f))  # the level average
    for lv in range(3):  # no tree yet: each level's own squared error
        err = (sae.level_reconstruction(f, lv) - x).pow(2).sum(1).mean()
        torch.testing.assert_close(out.terms[f"mse_level_{lv}"], err)
        l0 = (sae.level_latents(f, lv) > 0).float().sum(1).mean()
        torch.testing.assert_close(out.terms[f"l0_level_{lv}"], 0.5 * sae.cfg.l0_coefficient * l0)
    assert out.l0 == pytest.approx(float((f > 0).float().sum(1).mean()))
    sae.update_tree()
    torch.manual_seed(0)
    out = sae.training_loss(x, state=TrainState())
    assert {"structure_level_0", "structure_level_1"} <= set(out.terms)
    expected = sae.cfg.structure_coefficient * structure_loss(
        f[:, :4], f[:, 4:12], sae.W_dec[:4], sae.W_dec[4:12], sae.level_parents(1))
    torch.testing.assert_close(out.terms["structure_level_0"], expected)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in sae.parameters())


def test_perturbation_replaces_drawn_parents_by_their_children():
    sae = _hsae(perturbation_rate=1.0)  # every parent with children is replaced
    sae.update_tree()
    x = _x()
    out = sae.training_loss(x, state=TrainState())
    f = sae.encode(x)
    parents = sae.level_parents(1)
    has = torch.unique(parents[parents >= 0])
    rec = sae.level_reconstruction(f, 0) - f[:, has] @ sae.W_dec[has]
    kids = torch.nonzero(parents >= 0).flatten()
    rec = rec + f[:, 4 + kids] @ sae.W_dec[4 + kids]
    torch.testing.assert_close(out.terms["mse_level_0"], (rec - x).pow(2).sum(1).mean())
    # the finest level has no children: never perturbed
    torch.testing.assert_close(out.terms["mse_level_2"], (sae.level_reconstruction(f, 2) - x).pow(2).sum(1).mean())
    none = _hsae(perturbation_rate=0.0)
    none.update_tree()
    torch.testing.assert_close(none.training_loss(x, state=TrainState()).terms["mse_level_0"],
                               (none.level_reconstruction(f, 0) - x).pow(2).sum(1).mean())


def test_perturbation_rate_is_the_substitution_probability():
    sae = _hsae(levels=(40, 400), d_in=12, perturbation_rate=0.05, unassigned_fraction=0.0)
    sae.update_tree()
    layout = _TreeLayout(sae.level_parents(1), 40)
    counts = []
    torch.manual_seed(0)
    real_rand = torch.rand

    def counting_rand(n, **kw):
        r = real_rand(n, **kw)
        counts.append(float((r < 0.05).float().mean()))
        return r

    f = sae.encode(_x(8))
    torch.rand = counting_rand
    try:
        for _ in range(400):
            sae._perturbation(f[:, :40], f[:, 40:], sae.W_dec[:40], sae.W_dec[40:], layout)
    finally:
        torch.rand = real_rand
    assert sum(counts) / len(counts) == pytest.approx(0.05, abs=0.006)  # 400 draws of ~38 parents


def test_adaptive_sparsity_moves_each_level_towards_its_target():
    sae = _hsae(levels=(8, 16), target_l0=(2, 4))
    before = sae.level_l0_coefficient.clone()
    for _ in range(100):  # level 0 far too dense, level 1 far too sparse
        sae._adapt_sparsity(torch.tensor([6.0, 1.0]), total_steps=200)
    assert sae.level_l0_coefficient[0] > 2 * before[0] and sae.level_l0_coefficient[1] < 0.5 * before[1]
    traj = sae.level_l0_trajectory
    assert 2.0 < float(traj[0]) < 6.0 and 1.0 < float(traj[1]) < 4.0  # on the way from the first L0 to the target
    fixed = _hsae(levels=(8, 16), adaptive_sparsity=False)
    fixed._step_level_l0 = torch.tensor([6.0, 1.0])
    fixed.after_step(0, 100, torch.zeros(24, dtype=torch.bool), _x(), None)
    assert torch.equal(fixed.level_l0_coefficient, torch.full((2,), fixed.cfg.l0_coefficient))


def test_thresholds_start_where_each_level_fires_twice_its_target():
    torch.manual_seed(0)
    sae = make_sae(HSAEConfig(d_in=12, d_sae=72, level_sizes=(24, 48), target_l0=(3, 6)))
    sample = _x(4000) + 1.0
    sae.init_from_data(sample)
    f = sae.encode(sample)
    assert [float((sae.level_latents(f, lv) > 0).float().sum(1).mean()) for lv in (0, 1)] == \
        pytest.approx([6.0, 12.0], rel=0.01)
    assert bool(((f > 0).float().mean(0) > 0.2).all())  # every latent fires on its quarter of the tokens
    plain = make_sae(HSAEConfig(d_in=12, d_sae=72, level_sizes=(24, 48), initial_l0_factor=0))
    plain.init_from_data(sample)
    assert torch.allclose(plain.threshold, torch.full((72,), plain.cfg.threshold_init))


def test_lambda_scales_with_the_mean_or_the_median_energy():
    torch.manual_seed(0)
    sample = _x(4000) + 1.0
    sample[:40] *= 100  # a few massive-activation tokens: they dominate the mean, not the median
    lam = {}
    for energy in ("mean", "median"):
        sae = make_sae(HSAEConfig(d_in=12, d_sae=72, level_sizes=(24, 48), target_l0=(3, 6), l0_energy=energy))
        sae.init_from_data(sample)
        lam[energy] = sae.level_l0_coefficient.clone()
    mean = float(sample.pow(2).sum(-1).mean())
    median = float((sample - sae.b_dec).pow(2).sum(-1).median())
    c = sae.cfg.l0_coefficient
    assert lam["mean"].tolist() == pytest.approx([c * mean / 3, c * mean / 6], rel=1e-5)
    assert lam["median"].tolist() == pytest.approx([c * median / 3, c * median / 6], rel=1e-5)
    assert mean > 50 * median


# ---------------------------------------------------------------------------------------------------- levels, saving
def test_thresholds_are_stored_scaled_and_fold_with_the_input_scale():
    sae = _hsae()
    assert torch.allclose(sae.threshold, torch.exp(sae.log_threshold * 10))
    assert float(sae.threshold.min()) >= 0.1 - 1e-6 and float(sae.threshold.max()) <= 0.4 + 1e-6
    x = _x()
    import copy

    folded = copy.deepcopy(sae)
    folded.fold_input_scale(2.5)
    torch.testing.assert_close(folded(x), sae(x * 2.5) / 2.5, rtol=1e-5, atol=1e-5)
    for lv in range(3):  # the folded levels too
        torch.testing.assert_close(folded.level_sae(lv)(x), sae.level_sae(lv)(x * 2.5) / 2.5, rtol=1e-5, atol=1e-5)


def test_each_level_is_an_ordinary_jumprelu_sae():
    sae = _hsae()
    x = _x()
    f = sae.encode(x)
    for lv in range(3):
        level = sae.level_sae(lv)
        assert isinstance(level, JumpReLUSAE) and level.cfg.d_sae == sae.cfg.level_sizes[lv]
        torch.testing.assert_close(level.encode(x), sae.level_latents(f, lv), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(level(x), sae.level_reconstruction(f, lv), rtol=1e-5, atol=1e-5)
    mean = sum(sae.level_reconstruction(f, lv) for lv in range(3)) / 3
    torch.testing.assert_close(sae.decode(f), mean, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_with_levels_tree_and_saelens_view(tmp_path):
    sae = _hsae()
    sae.update_tree()
    sae.level_l0_coefficient.copy_(torch.tensor([0.5, 0.25, 0.125]))
    folder = save_sae(sae, tmp_path / "hsae", metadata={"hook_name": "layers.1.resid_post"},
                      feature_stats={"sparsity": torch.linspace(-3, -1, 32)})
    again = load_sae(folder)
    assert isinstance(again, HSAE)
    for k, v in sae.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    x = _x()
    # the SAELens file alone is a JumpReLU that decodes the level average
    from safetensors.torch import load_file

    weights = load_file(str(folder / "sae_weights.safetensors"))
    assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    f = x @ weights["W_enc"] + weights["b_enc"]
    f = f * (f > weights["threshold"])
    torch.testing.assert_close(f @ weights["W_dec"] + weights["b_dec"], sae(x), rtol=1e-5, atol=1e-5)
    # every level is its own folder, loadable as a JumpReLU, with its slice of the statistics
    for lv in range(3):
        level = load_sae(folder / "levels" / f"level_{lv}")
        torch.testing.assert_close(level(x), sae.level_sae(lv)(x))
        cfg = json.loads((folder / "levels" / f"level_{lv}" / "cfg.json").read_text())
        assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["hsae_level"] == lv
        assert cfg["saeforge"]["config"]["l0_coefficient"] == [0.5, 0.25, 0.125][lv]
    # the tree file matches the SAE
    tree = FeatureTree.load(folder / "tree.json")
    assert tree.kind == "hsae" and tree.widths == [4, 8, 20]
    assert tree.parents[1].tolist() == sae.level_parents(2).tolist()
    levels = tree.load_levels()
    assert all(s.cfg.d_sae == 32 for s, _ in levels) and levels[2][1] == slice(12, 32)


# ---------------------------------------------------------------------------------------------------- training
def _train_cfg(cache, out, **kw):
    base = dict(out=str(out), cache=str(cache.folder), sites=(SITES[0],), tokens=256 * 40, batch_size=256,
                architecture="hsae", sae_options=json.dumps({"level_sizes": [16, 64], "target_l0": [4, 8],
                                                             "tree_update_every": 6}),
                checkpoint_every=5, log_every=5, progress=False, device="cpu", lr_warmup_steps=5)
    return TrainConfig(**{**base, **kw})


def test_trains_with_saeforge_train_and_resumes_bit_identically(tiny_cache, tmp_path, monkeypatch):
    final = train(_train_cfg(tiny_cache, tmp_path / "whole"))[SITES[0]]
    assert {"loss_structure_level_0", "loss_mse_level_1"} <= set(final)
    folder = tmp_path / "whole" / "saes" / SITES[0]
    sae = load_sae(folder)
    assert sae.cfg.level_sizes == (16, 64) and int(sae.tree_updates) == 7  # steps 6, 12, ..., 36 and 40 of 40
    # the saved tree is the rule applied to the saved weights
    expected, _ = assign_parents(sae.level_vectors(1), sae.level_vectors(0), sae.cfg.unassigned_fraction)
    assert torch.equal(sae.level_parents(1), expected)
    assert int((sae.level_parents(1) >= 0).sum()) == 64 - int(0.2 * 64)
    # both levels start far denser than their targets: λ grew (reaching the target L0 takes longer runs than this;
    # tests/hierarchy/test_synthetic.py checks that it is reached)
    assert bool((sae.level_l0_coefficient > 1.5 * sae.cfg.l0_coefficient).all())
    real_step = Trainer._train_step
    calls = {"n": 0}

    def dying_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 14:  # after the tree update at step 12, between the checkpoints at 10 and 15
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "_train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(_train_cfg(tiny_cache, tmp_path / "cut"))
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    train(TrainConfig(resume=str(tmp_path / "cut"), progress=False))
    a, b = load_sae(folder), load_sae(tmp_path / "cut" / "saes" / SITES[0])
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    assert (tmp_path / "cut" / "saes" / SITES[0] / "tree.json").read_text() == (folder / "tree.json").read_text()
