"""Semi-NMF with winner-take-all sparsity (saeforge.neurons.snmf) on synthetic data with planted neuron groups."""

from __future__ import annotations

import json

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.neurons.snmf import (SNMF, CacheChunks, SNMFSettings, encode, fit_hierarchy, fit_snmf, neurons_kept,
                                   winner_take_all)


def planted(seed: int, d: int = 64, k: int = 6, n: int = 3000, per: int = 8, noise: float = 0.01):
    """X = G Z + noise: k features on disjoint groups of ``per`` neurons (signed weights), sparse G ≥ 0."""
    g = torch.Generator().manual_seed(seed)
    z = torch.zeros(k, d)
    perm = torch.randperm(d, generator=g)
    for i in range(k):
        idx = perm[i * per:(i + 1) * per]
        z[i, idx] = torch.randn(per, generator=g).sign() * (0.5 + torch.rand(per, generator=g))
    coef = torch.rand(n, k, generator=g) * (torch.rand(n, k, generator=g) < 0.3)
    return coef @ z + noise * torch.randn(n, d, generator=g), z, coef


def _best_cosines(found: torch.Tensor, planted_z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos = (torch.nn.functional.normalize(planted_z, dim=1) @ torch.nn.functional.normalize(found, dim=1).T).abs()
    return cos.max(1).values, cos.argmax(1)


@pytest.mark.parametrize("seed", range(8))
def test_planted_neuron_groups_are_recovered_with_their_exact_neurons(seed):
    x, z, _ = planted(100 + seed)
    fit = fit_snmf(x, SNMFSettings(rank=6, sparsity=8 / 64, max_iter=3000, patience=100, tol=1e-6, seed=seed))
    best, match = _best_cosines(fit.features, z)
    assert best.min() > 0.999, best
    assert len(set(match.tolist())) == 6  # one found feature per planted group
    for i in range(6):
        assert torch.equal(fit.features[match[i]] != 0, z[i] != 0)  # the very neurons of the group
    noise_floor = 0.01 ** 2 * x.numel() / float(x.pow(2).sum())
    assert fit.best_loss < 5 * noise_floor and fit.info["converged"]  # a missed group leaves > 15x


def test_without_winner_take_all_the_objective_never_increases():
    x, _, _ = planted(7, noise=0.3)
    fit = fit_snmf(x, SNMFSettings(rank=5, sparsity=1.0, max_iter=150, patience=150, seed=3))
    h = torch.tensor(fit.history, dtype=torch.float64)
    assert len(h) == 150
    assert (h[1:] <= h[:-1] + 1e-7).all(), (h[1:] - h[:-1]).max()
    assert h[-1] < 0.7 * h[0]


def test_with_winner_take_all_the_best_objective_decreases_and_matches_the_factors():
    x, _, _ = planted(8)
    fit = fit_snmf(x, SNMFSettings(rank=6, sparsity=8 / 64, max_iter=300, patience=300, seed=0))
    assert fit.best_loss < 0.02 * fit.history[0]
    recon = fit.coefficients @ fit.features  # the kept best factors reproduce the best recorded loss
    assert abs(float((x - recon).pow(2).sum() / x.pow(2).sum()) - fit.best_loss) < 1e-4
    assert (fit.coefficients >= 0).all()


@pytest.mark.parametrize("sparsity", [0.01, 0.05, 0.3])
def test_winner_take_all_keeps_exactly_the_top_neurons(sparsity):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 200, generator=g)
    fit = fit_snmf(x, SNMFSettings(rank=12, sparsity=sparsity, max_iter=20, patience=20, seed=1))
    keep = neurons_kept(sparsity, 200)
    assert keep == -(-round(sparsity * 200 * 1000) // 1000)
    assert ((fit.features != 0).sum(1) == keep).all()
    z = torch.randn(7, 50, generator=g)
    kept = winner_take_all(z, 5)
    for row, orig in zip(kept, z):
        nz = row.nonzero().squeeze(1)
        assert len(nz) == 5 and torch.equal(row[nz], orig[nz])
        assert orig.abs()[nz].min() >= orig.abs()[row == 0].max()


def test_encode_finds_nonnegative_coefficients_as_good_as_the_fit():
    x, z, _ = planted(11)
    fit = fit_snmf(x, SNMFSettings(rank=6, sparsity=8 / 64, max_iter=500, patience=60, seed=0))
    held_out, _, _ = planted(11, n=500)  # the same groups, new tokens
    g = fit.encode(held_out)
    assert g.shape == (500, 6) and (g >= 0).all()
    rel = float((held_out - g @ fit.features).pow(2).sum() / held_out.pow(2).sum())
    assert rel < fit.best_loss * 1.2
    acts = fit.activations(held_out)
    assert torch.allclose(acts, g * fit.features.norm(dim=1), rtol=1e-4, atol=1e-6)
    assert torch.allclose(encode(held_out, fit.features), g)


def test_a_cache_is_streamed_shard_by_shard_to_the_same_fit(tmp_path):
    from saeforge.data.activation_cache import ActivationCache

    x, _, _ = planted(12, n=2400)
    cache = ActivationCache.from_arrays(tmp_path / "cache", {"layers.0.mlp_hidden": x}, shard_tokens=500,
                                        progress=False)
    chunks = CacheChunks(cache, "layers.0.mlp_hidden")
    assert len(chunks) == 5 and chunks.n == 2400
    s = SNMFSettings(rank=6, sparsity=8 / 64, max_iter=60, patience=60, seed=2)
    streamed, whole = fit_snmf(chunks, s), fit_snmf(x, s)
    assert torch.allclose(torch.tensor(streamed.history), torch.tensor(whole.history), rtol=1e-3, atol=1e-5)
    assert torch.allclose(streamed.features, whole.features, rtol=1e-3, atol=1e-4)
    assert CacheChunks(cache, "layers.0.mlp_hidden", max_tokens=1200).n == 1200


def test_a_killed_fit_resumes_from_its_checkpoint_to_the_same_result(tmp_path):
    x, _, _ = planted(13)
    s = SNMFSettings(rank=6, sparsity=8 / 64, max_iter=80, patience=80, seed=4)
    whole = fit_snmf(x, s)

    class Killed(Exception):
        pass

    def kill(it, _rel):
        if it == 37:
            raise Killed

    with pytest.raises(Killed):
        fit_snmf(x, s, checkpoint=tmp_path, checkpoint_every=10, on_iteration=kill)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["iteration"] == 30
    resumed = fit_snmf(x, s, checkpoint=tmp_path, checkpoint_every=10)
    assert resumed.history == whole.history
    assert torch.equal(resumed.features, whole.features)
    with pytest.raises(SaeforgeError, match="another fit"):
        fit_snmf(x, SNMFSettings(rank=5, sparsity=8 / 64, max_iter=80, patience=80, seed=4), checkpoint=tmp_path)


def test_save_and_load_round_trip(tmp_path):
    x, _, _ = planted(14)
    fit = fit_snmf(x, SNMFSettings(rank=6, sparsity=8 / 64, max_iter=40, patience=40), info={"site": "s"})
    fit.save(tmp_path / "f")
    back = SNMF.load(tmp_path / "f")
    assert torch.equal(back.features, fit.features) and back.history == fit.history
    assert back.settings == fit.settings and back.info["site"] == "s"
    assert back.neurons(0).tolist() == fit.features[0].nonzero().squeeze(1)[
        fit.features[0][fit.features[0] != 0].abs().argsort(descending=True)].tolist()
    with pytest.raises(SaeforgeError, match="no SNMF fit"):
        SNMF.load(tmp_path)


def test_hierarchy_mixes_fine_features_from_sparse_coarse_ones():
    g = torch.Generator().manual_seed(5)
    # 3 coarse groups of 10 neurons; each fine feature = one coarse group + its own 3 neurons
    d, coarse = 60, torch.zeros(3, 60)
    for c in range(3):
        coarse[c, c * 10:(c + 1) * 10] = 1 + torch.rand(10, generator=g)
    fine_true = torch.zeros(9, d)
    for f in range(9):
        fine_true[f] = coarse[f // 3] + 0  # the parent's neurons ...
        fine_true[f, 30 + f * 3:30 + f * 3 + 3] = 2 + torch.rand(3, generator=g)  # ... and its own
    coef = torch.rand(2000, 9, generator=g) * (torch.rand(2000, 9, generator=g) < 0.25)
    x = coef @ fine_true + 0.01 * torch.randn(2000, d, generator=g)
    fine = fit_snmf(x, SNMFSettings(rank=9, sparsity=13 / 60, max_iter=600, patience=80, seed=0))
    tree = fit_hierarchy(fine, 3, x, finetune_steps=30, lr=1e-3)
    assert tree.coarse.shape == (3, d) and tree.mixing.shape == (9, 3) and (tree.mixing >= 0).all()
    assert ((tree.coarse != 0).sum(1) == 13).all()  # the coarse features are winner-take-all sparse too
    assert torch.allclose(tree.features, tree.mixing @ tree.coarse)  # tuned: the paper's joint model
    assert torch.equal(fit_hierarchy(fine, 3).features, fine.features)  # untuned: the fine features as fitted
    assert tree.info["finetune_rel_loss"]["last"] <= tree.info["finetune_rel_loss"]["first"]
    # each fine feature's strongest parent is the coarse feature on its planted parent's neurons
    parent_of = {}
    for c in range(3):
        parent_of[c] = int((tree.coarse[:, c * 10:(c + 1) * 10].abs().sum(1)).argmax())
    best, match = _best_cosines(fine.features, fine_true)
    for f in range(9):
        assert int(tree.mixing[match[f]].argmax()) == parent_of[f // 3]
    with pytest.raises(SaeforgeError, match="not below the fine rank"):
        fit_hierarchy(fine, 9)


def test_bad_ranks_and_settings_are_refused_before_fitting():
    x = torch.randn(100, 16)
    with pytest.raises(SaeforgeError, match="above the number of neurons") as err:
        fit_snmf(x, SNMFSettings(rank=17))
    assert "--rank 16" in err.value.fix
    with pytest.raises(SaeforgeError, match="above the number of tokens"):
        fit_snmf(torch.randn(10, 16), SNMFSettings(rank=12))
    with pytest.raises(SaeforgeError, match="no features"):
        fit_snmf(x, SNMFSettings(rank=0))
    with pytest.raises(SaeforgeError, match="sparsity"):
        fit_snmf(x, SNMFSettings(rank=4, sparsity=0.0))
    with pytest.raises(SaeforgeError, match="NaN"):
        fit_snmf(torch.full((100, 16), float("nan")), SNMFSettings(rank=4))
    with pytest.raises(SaeforgeError, match="2-D"):
        fit_snmf(torch.randn(2, 50, 16), SNMFSettings(rank=4))
