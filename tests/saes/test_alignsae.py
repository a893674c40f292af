"""AlignSAE (arXiv 2512.02004): the loss on hand-computed cases, alignment on synthetic data with known concept
directions (directly and through the trainer, labels read from the cache), and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.saes import AlignSAE, AlignSAEConfig, TrainState, load_sae, make_sae
from saeforge.saes.alignsae import cross_cov_sq, offdiag_cov_sq

CONCEPTS = ("royalty", "number", "colour", "day")


def _hand_sae(**kw) -> AlignSAE:
    """d_in 2, two free latents reading x as is, one concept latent reading x1 + x2; the concept decodes to 0."""
    sae = make_sae(AlignSAEConfig(d_in=2, d_sae=3, concepts=("c",), b_dec_init="zeros", **kw))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        sae.b_dec.zero_()
    return sae


X = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
Y = torch.tensor([[1.0], [0.0]])


def test_loss_terms_by_hand():
    # z = relu([[1, 2, 3], [3, -1, 2]]) = [[1, 2, 3], [3, 0, 2]];  x_hat = [[1, 2], [3, 0]]
    out = _hand_sae().training_loss(X, state=TrainState(labels=Y))
    t = {k: float(v.detach()) for k, v in out.terms.items()}
    assert t["mse"] == pytest.approx(0.5)  # (0 + 1) / 2 tokens
    # every other term is the paper's times d_out = 2
    assert t["align"] == pytest.approx(2 * ((3 - 1) ** 2 + (2 - 0) ** 2) / 2)  # MSE(z_c, y) = 4
    assert t["sparse"] == pytest.approx(2 * 1e-3 * (1 + 2 + 3 + 0) / 4)
    # z_free centred [[-1, 1], [1, -1]]: Cov = [[1, -1], [-1, 1]], off-diagonal squares sum to 2
    assert t["indep"] == pytest.approx(2 * 1e-2 * 2)
    # z_c centred [0.5, -0.5]: CrossCov = [-0.5, 0.5], squares sum to 0.5
    assert t["ortho"] == pytest.approx(2 * 1e-2 * 0.5)
    assert float(out.loss.detach()) == pytest.approx(sum(t.values()))
    assert out.l0 == pytest.approx(2.5) and out.fired.tolist() == [True, True, True]


def test_linear_activation_and_coefficients():
    sae = _hand_sae(activation="linear", align_coefficient=0.5, indep_coefficient=0.0)
    t = {k: float(v.detach()) for k, v in sae.training_loss(X, state=TrainState(labels=Y)).terms.items()}
    assert t["mse"] == pytest.approx(0.0)  # z = [[1, 2, 3], [3, -1, 2]] decodes to x exactly
    assert t["align"] == pytest.approx(0.5 * 2 * 4) and t["indep"] == 0.0
    assert t["sparse"] == pytest.approx(2 * 1e-3 * (1 + 2 + 3 + 1) / 4)


def test_pretraining_is_reconstruction_only():
    sae = _hand_sae()  # pretrain_fraction 1/3: steps 0-2 of 9 reconstruct only
    early = sae.training_loss(X, state=TrainState(step=2, total_steps=9, labels=Y))
    late = sae.training_loss(X, state=TrainState(step=3, total_steps=9, labels=Y))
    assert set(early.terms) == set(late.terms) == {"mse", "sparse", "indep", "align", "ortho"}
    assert float(early.loss) == pytest.approx(0.5) and float(late.loss) > 8


@pytest.mark.parametrize("n", [5, 40])  # fewer rows than latents (the Gram form) and more
def test_covariance_penalties_match_their_definitions(n):
    g = torch.Generator().manual_seed(n)
    z, c = torch.randn(n, 12, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)
    cov = torch.cov(z.T, correction=0)
    assert float(offdiag_cov_sq(z)) == pytest.approx(float((cov - torch.diag(torch.diag(cov))).pow(2).sum()),
                                                     rel=1e-9)
    cross = torch.cov(torch.cat([c, z], 1).T, correction=0)[:3, 3:]
    assert float(cross_cov_sq(c, z)) == pytest.approx(float(cross.pow(2).sum()), rel=1e-9)


# ------------------------------------------------------------------------------------------- synthetic concepts
def synthetic(n: int, seed: int, d: int = 32, n_background: int = 48):
    """Activations made of sparse background features plus, on a labelled token, its concept's direction at a
    random strength; the concept directions are known (unit norm, [C, d])."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(len(CONCEPTS), d, generator=torch.Generator()
                                                           .manual_seed(1234)), dim=1)
    background = torch.nn.functional.normalize(torch.randn(n_background, d, generator=torch.Generator()
                                                           .manual_seed(99)), dim=1)
    on = (torch.rand(n, n_background, generator=g) < 0.08).float() * (0.5 + torch.rand(n, n_background, generator=g))
    labels = torch.zeros(n, len(CONCEPTS))
    which = torch.randint(0, len(CONCEPTS) + 2, (n,), generator=g)  # a third of the tokens show no concept
    rows = which < len(CONCEPTS)
    labels[rows.nonzero().squeeze(1), which[rows]] = 1.0
    strength = 2.0 + torch.rand(n, 1, generator=g)
    x = on @ background + (labels * strength) @ directions + 0.05 * torch.randn(n, d, generator=g)
    return x, labels, directions


def _auroc(score: torch.Tensor, positive: torch.Tensor) -> float:
    from saeforge.interventions.concepts import auroc

    return auroc(score, positive > 0.5)


def test_supervised_latents_align_with_the_true_directions():
    torch.manual_seed(0)
    x, labels, directions = synthetic(24_000, seed=1)
    sae = make_sae(AlignSAEConfig(d_in=32, d_sae=64, concepts=CONCEPTS))
    sae.init_from_data(x[:4096])
    opt = torch.optim.AdamW(sae.parameters(), lr=1e-3)
    steps = 1500
    for step in range(steps):
        i = torch.randint(0, x.shape[0], (256,))
        out = sae.training_loss(x[i], state=TrainState(step=step, total_steps=steps, labels=labels[i]))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    x_test, y_test, _ = synthetic(4000, seed=2)
    cols = [sae.concept_index(c) for c in CONCEPTS]
    z = sae.encode(x_test).detach()
    for j, col in enumerate(cols):
        cos = float(torch.nn.functional.cosine_similarity(sae.W_dec[col].detach(), directions[j], dim=0))
        assert cos > 0.75, (CONCEPTS[j], cos)  # a random direction: 0 ± 0.18 in 32 dimensions
        assert _auroc(z[:, col], y_test[:, j]) > 0.98
    assert min(sae.binding_accuracy(x_test, y_test).values()) > 0.95
    # the concept latent reads ~1 where its concept is and ~0 elsewhere (the alignment target)
    on = z[:, cols][y_test > 0.5]
    off = z[:, cols][y_test < 0.5]
    assert abs(float(on.mean()) - 1) < 0.15 and float(off.mean()) < 0.1


def test_trainer_reads_the_labels_from_the_cache(tmp_path):
    from saeforge.data.activation_cache import ActivationCache
    from saeforge.training import TrainConfig, train

    x, labels, _ = synthetic(16_384, seed=3)
    cache = ActivationCache.from_arrays(tmp_path / "cache", {"acts": x, "concepts": labels}, progress=False,
                                        shard_tokens=4096)
    options = '{"concepts": ["royalty", "number", "colour", "day"]}'
    cfg = TrainConfig(out=str(tmp_path / "run"), cache=str(cache.folder), sites=("acts",), architecture="alignsae",
                      d_sae=64, sae_options=options, tokens=256 * 240, batch_size=256, progress=False, device="cpu",
                      lr_warmup_steps=5, checkpoint_every=100)
    final = train(cfg)["acts"]
    assert final["loss_align"] > 0 and math.isfinite(final["loss"])
    sae = load_sae(tmp_path / "run" / "saes" / "acts")
    assert isinstance(sae, AlignSAE) and sae.cfg.concepts == CONCEPTS
    x_test, y_test, _ = synthetic(4000, seed=4)
    z = sae.encode(x_test).detach()
    for j, c in enumerate(CONCEPTS):
        col = sae.concept_index(c)
        # labels shuffled apart from their rows would leave chance here (0.5)
        assert _auroc(z[:, col], y_test[:, j]) > 0.97, c
    assert min(sae.binding_accuracy(x_test, y_test).values()) > 0.9


# ------------------------------------------------------------------------------------------------- bad input
def test_a_concept_block_wider_than_d_sae_is_refused():
    with pytest.raises(SaeforgeError, match="leaves no free latent") as err:
        AlignSAEConfig(d_in=8, d_sae=4, concepts=CONCEPTS)
    assert "--d-sae" in err.value.fix
    with pytest.raises(SaeforgeError, match="repeat"):
        AlignSAEConfig(d_in=8, d_sae=16, concepts=("a", "a"))


def test_unknown_concept_names_are_refused():
    sae = make_sae(AlignSAEConfig(d_in=8, d_sae=16, concepts=("royalty", "number")))
    assert sae.concept_index("number") == 15
    with pytest.raises(SaeforgeError, match="unknown concept 'weekday'.*royalty, number") as err:
        sae.concept_index("weekday")
    assert "concept_index('royalty')" in err.value.fix


@pytest.mark.parametrize("labels, message", [
    (None, "came without concept labels"),
    (torch.zeros(5, 2), r"\[5, 2\] but the activations need \[4, 2\]"),  # one row too many
    (torch.zeros(4, 3), r"\[4, 3\] but the activations need \[4, 2\]"),  # a concept too many
    (torch.full((4, 2), 2.0), "must be 0/1"),
])
def test_labels_that_do_not_match_the_activations_are_refused(labels, message):
    sae = make_sae(AlignSAEConfig(d_in=8, d_sae=16, concepts=("royalty", "number")))
    with pytest.raises(SaeforgeError, match=message):
        sae.training_loss(torch.randn(4, 8), state=TrainState(labels=labels))


def test_the_trainer_refuses_missing_labels_before_training(tmp_path):
    from saeforge.data.activation_cache import ActivationCache
    from saeforge.training import TrainConfig, train

    x, labels, _ = synthetic(2048, seed=5)
    options = '{"concepts": ["royalty", "number", "colour", "day"]}'
    unlabelled = ActivationCache.from_arrays(tmp_path / "plain", {"acts": x}, progress=False)
    base = dict(sites=("acts",), architecture="alignsae", d_sae=64, sae_options=options, tokens=1024,
                batch_size=256, progress=False, device="cpu")
    with pytest.raises(SaeforgeError, match="does not hold") as err:
        train(TrainConfig(out=str(tmp_path / "r1"), cache=str(unlabelled.folder), **base))
    assert "label_site" in err.value.fix
    with pytest.raises(SaeforgeError, match="only an activation cache holds"):
        train(TrainConfig(out=str(tmp_path / "r2"), **base))
    narrow = ActivationCache.from_arrays(tmp_path / "narrow", {"acts": x, "concepts": labels[:, :3]}, progress=False)
    with pytest.raises(SaeforgeError, match=r"need \[256, 4\]"):
        train(TrainConfig(out=str(tmp_path / "r3"), cache=str(narrow.folder), **base))


def test_a_concept_latent_off_on_its_own_concept_still_learns_it():
    """The alignment term reads the pre-activation on the concept's tokens: a ReLU latent that is off there gets
    the gradient that turns it on (reading the activation, it would be dead for good), while elsewhere only the
    activation counts (a latent off where its concept is absent costs nothing)."""
    sae = _hand_sae(indep_coefficient=0.0, ortho_coefficient=0.0, sparse_coefficient=0.0)
    with torch.no_grad():
        sae.b_enc[2] = -10.0  # pre = x1 + x2 - 10: off on both tokens, the labelled one included
    out = sae.training_loss(X, state=TrainState(labels=Y))
    # on the labelled token the pre-activation (3 - 10 = -7) is compared with 1; the other token costs 0
    assert float(out.terms["align"].detach()) == pytest.approx(2 * ((-7 - 1) ** 2 + 0) / 2)
    out.loss.backward()
    assert float(sae.b_enc.grad[2]) < 0  # descent raises the bias: the latent turns on
    assert float(sae.W_enc.grad[:, 2].abs().sum()) > 0
    sae.zero_grad()
    sae.training_loss(X, state=TrainState(labels=torch.zeros(2, 1))).loss.backward()
    assert float(sae.b_enc.grad[2]) == 0.0  # unlabelled everywhere and off everywhere: nothing to change
