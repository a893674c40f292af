"""Model diffing on ground truth: two "models" share most features and each has a few of its own; a crosscoder
trained on both must give the shared ones relative norm ~0.5 and each model's own ones ~0 or ~1."""

from __future__ import annotations

import math

import pytest
import torch

from saeforge.diffing.analysis import (
    ExampleTracker,
    classify,
    decoder_cosines,
    lean_by_text,
    norm_histogram,
    relative_norms,
)
from saeforge.errors import SaeforgeError
from saeforge.evals.synthetic import SparseFeatureModel
from saeforge.saes import DeadLatentTracker, TopKConfig, TopKCrosscoderConfig, TrainState, make_sae
from saeforge.training.scaling import SiteScaler

D, N_SHARED, N_OWN, TRUE_L0 = 24, 48, 8, 3


def _unit(g, *shape):
    t = torch.randn(*shape, generator=g)
    return t / t.norm(dim=-1, keepdim=True)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_shared_and_exclusive_features_are_found(one_thread):
    """48 shared features (B's directions a perturbed copy of A's), 8 only in A, 8 only in B, 3 active per token.
    Checked by hand on seeds 0 and 1: every exclusive feature found (decoder cosine >= 0.99), r <= 0.06 for A's,
    >= 0.92 for B's, shared 0.48-0.55; classes exactly 8 / 8 / 48-49."""
    seed, steps = 0, 700
    torch.manual_seed(seed)
    codes = SparseFeatureModel.create(D, N_SHARED + 2 * N_OWN, mean_active=TRUE_L0, frequency_exponent=0.0,
                                      seed=seed)
    g = torch.Generator().manual_seed(seed + 5)
    shared_a = _unit(g, N_SHARED, D)
    shared_b = shared_a + 0.3 * _unit(g, N_SHARED, D)
    shared_b = shared_b / shared_b.norm(dim=1, keepdim=True)
    only_a, only_b = _unit(g, N_OWN, D), _unit(g, N_OWN, D)

    def sample(n):
        _, c = codes.sample(n, generator=g)
        cs, ca, cb = c[:, :N_SHARED], c[:, N_SHARED:N_SHARED + N_OWN], c[:, N_SHARED + N_OWN:]
        return torch.cat([cs @ shared_a + ca @ only_a, 3.0 * (cs @ shared_b + cb @ only_b)], 1)  # B at 3x scale

    cfg = TopKCrosscoderConfig(d_in=2 * D, d_sae=96, n_sites=2, k=4, dead_after_tokens=20_000)
    x0 = sample(4096)
    scaler = SiteScaler.fit([x0[:, :D], x0[:, D:]], "expected_norm")  # as the trainer does: one scale per model
    sae = make_sae(cfg)
    sae.init_from_data(scaler.scale_input(x0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (steps - s) / (0.3 * steps)))
    tracker = DeadLatentTracker(cfg.d_sae, 20_000)
    for step in range(steps):
        out = sae.training_loss(scaler.scale_input(sample(512)), state=TrainState(step=step,
                                                                                  dead_mask=tracker.dead_mask))
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
        opt.zero_grad()
        sched.step()
        tracker.update(out.fired, 512)
    scaler.fold_into(sae)

    r = relative_norms(sae, list(scaler.scale_out))
    # without the scales the 3x larger model B would look like it owns everything
    assert float(relative_norms(sae)[~torch.isnan(r)].median()) > 0.65
    w = sae.W_dec.detach().reshape(cfg.d_sae, 2, D)

    def best(directions, part):
        unit = w[:, part] / w[:, part].norm(dim=1, keepdim=True).clamp_min(1e-9)
        return (directions @ unit.T).max(1)

    cos_b, latent_b = best(only_b, 1)
    cos_a, latent_a = best(only_a, 0)
    _, latent_s = best(shared_a, 0)
    assert cos_b.min() > 0.95 and cos_a.min() > 0.95
    assert r[latent_b].min() > 0.85 and r[latent_a].max() < 0.15
    assert ((r[latent_s] - 0.5).abs() < 0.1).all()
    alive = (sae.encode(sample(8192)) > 0).any(0)
    counts = classify(r, alive).counts()
    assert counts["exclusive_a"] == N_OWN and counts["exclusive_b"] == N_OWN
    assert N_SHARED - 3 <= counts["shared"] <= N_SHARED + 3
    assert decoder_cosines(sae)[latent_s].mean() > 0.9  # shared latents point alike in both models
    hist = norm_histogram(r, alive, bins=10)
    assert sum(hist["counts"]) == int(alive.sum()) and hist["counts"][0] >= N_OWN and hist["counts"][-1] >= N_OWN


def test_relative_norms_need_two_sites():
    with pytest.raises(SaeforgeError, match="two sites"):
        relative_norms(make_sae(TopKConfig(d_in=8, d_sae=16, k=2)))
    with pytest.raises(SaeforgeError, match="class bounds"):
        classify(torch.rand(4), torch.ones(4, dtype=torch.bool), exclusive=0.6)


def test_example_tracker_keeps_the_strongest_and_counts_by_source():
    tracker = ExampleTracker([1, 3], n=2, sources=("focus", "other"))
    f = torch.zeros(5, 4)
    f[:, 1] = torch.tensor([0.5, 2.0, 0.0, 1.0, 3.0])
    f[2, 3] = 7.0
    tracker.update("focus", f, torch.arange(5), torch.arange(5) + 10, 4)
    g = torch.zeros(3, 4)
    g[0, 1] = 2.5
    tracker.update("other", g, torch.tensor([7, 7, 8]), torch.tensor([1, 2, 3]), 4)
    assert tracker.top(1) == [(3.0, "focus", 4, 14), (2.5, "other", 7, 1)]
    assert tracker.top(3) == [(7.0, "focus", 2, 12)]
    assert tracker.rates(1) == {"focus": 4 / 5, "other": 1 / 3}
    assert tracker.focus_share(1) == 0.5 and tracker.focus_share(3) == 1.0
    assert math.isnan(ExampleTracker([0]).focus_share(0))


def test_lean_by_text_groups_latents_by_where_they_fire():
    """Six latents: two fire 4x as often on the focus text, two alike on both, one mostly elsewhere, one too rarely
    to count; r grows and the cosine falls with the focus/other ratio, so both rank correlations are 1."""
    fired_focus = torch.tensor([40, 80, 10, 20, 2, 1])  # over 1000 focus tokens
    fired_other = torch.tensor([20, 40, 20, 40, 16, 1])  # over 2000 other tokens: rates x2 ... x0.25
    r = torch.tensor([0.60, 0.70, 0.50, 0.52, 0.40, 0.99])
    cos = torch.tensor([0.7, 0.6, 0.9, 0.85, 0.95, -1.0])
    out = lean_by_text(r, cos, fired_focus, 1000, fired_other, 2000, ratio=2.0, min_fired=5)
    assert out["latents"] == 5  # latent 5 fired twice: not counted
    g = out["groups"]
    assert (g["focus"]["latents"], g["both"]["latents"], g["other"]["latents"]) == (2, 2, 1)
    assert g["focus"]["mean_relative_norm"] == pytest.approx(0.65)
    assert g["focus"]["mean_decoder_cosine"] == pytest.approx(0.65)
    assert g["both"]["mean_relative_norm"] == pytest.approx(0.51)
    assert g["other"]["mean_relative_norm"] == pytest.approx(0.40)
    # r follows the rate ratio except between the two latents firing about alike on both texts
    assert out["spearman_relative_norm"] > 0.8 and out["spearman_one_minus_cosine"] > 0.8
    shuffled = lean_by_text(r.flip(0), cos, fired_focus, 1000, fired_other, 2000)
    assert shuffled["spearman_relative_norm"] < 0
    with pytest.raises(SaeforgeError, match="needs tokens of both texts"):
        lean_by_text(r, cos, fired_focus, 0, fired_other, 2000)
