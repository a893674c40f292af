"""ReLU SAE: the April-2024 and classic variants, and classic's dead-latent resampling."""

from __future__ import annotations

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.saes import ReLUConfig, TrainState, make_sae

from .helpers import D_SAE, batch, build, num


def test_variant_defaults():
    april = ReLUConfig(d_in=8, d_sae=16)
    assert (april.variant, april.apply_b_dec_to_input, april.b_dec_init) == ("april2024", False, "zeros")
    assert april.decoder_init_norm == 0.1 and april.resample_every is None
    classic = ReLUConfig(d_in=8, d_sae=16, variant="classic")
    assert (classic.apply_b_dec_to_input, classic.b_dec_init) == (True, "geometric_median")
    assert classic.decoder_init_norm == 1.0 and classic.resample_every == 25_000


@pytest.mark.parametrize("kwargs, match", [
    ({"variant": "2023"}, "unknown variant"),
    ({"resample_every": 100}, "does not resample"),
    ({"variant": "classic", "resample_every": -1}, "resample_every"),
    ({"variant": "classic", "decoder_init_norm": 0.1}, "unit-norm"),
    ({"l1_coefficient": -1.0}, "l1_coefficient"),
    ({"decoder_init_norm": 0.0}, "decoder_init_norm"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(SaeforgeError, match=match):
        ReLUConfig(d_in=8, d_sae=16, **kwargs)


def test_april_l1_is_weighted_by_decoder_norms():
    sae = build("relu_april")
    x = batch(32)
    out = sae.training_loss(x, state=TrainState())
    f = sae.encode(x)
    expected = 5.0 * (f * sae.W_dec.norm(dim=1)).sum(1).mean()
    assert torch.allclose(out.terms["l1"], expected)
    # doubling the decoder rows doubles the penalty (the encoder, hence f, is unchanged)
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
    assert torch.allclose(sae.training_loss(x, state=TrainState()).terms["l1"], 2 * expected)


def test_april_does_not_subtract_b_dec_but_classic_does():
    x = batch(8)
    for variant, moves in (("relu_april", False), ("relu_classic", True)):
        sae = build(variant)
        f = sae.encode(x)
        with torch.no_grad():
            sae.b_dec.add_(1.0)
        assert (not torch.allclose(sae.encode(x), f)) is moves


def test_classic_l1_is_plain():
    sae = build("relu_classic")
    x = batch(32)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)  # a plain L1 ignores the decoder norms
    out = sae.training_loss(x, state=TrainState())
    assert sae.cfg.l1_coefficient == 2.0 and build("relu").cfg.l1_coefficient == 5.0  # per-variant defaults
    assert torch.allclose(out.terms["l1"], 2.0 * sae.encode(x).sum(1).mean())


def _classic_with_dead_latents():
    torch.manual_seed(0)
    sae = make_sae(ReLUConfig(d_in=6, d_sae=10, variant="classic", l1_coefficient=0.1))
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[1, 4, 7]] = True
    with torch.no_grad():
        sae.b_enc[dead] = -100.0  # never fires
        sae.W_enc[:, ~dead] *= torch.linspace(0.5, 2.0, 7)
    return sae, dead


def test_resampling_resets_dead_latents_towards_badly_reconstructed_inputs():
    sae, dead = _classic_with_dead_latents()
    x = torch.zeros(50, 6)
    # Every input but one is 0, which the SAE reconstructs exactly (b_dec = 0, no latent fires on 0), so the
    # loss-weighted draw can only pick the one bad input.
    with torch.no_grad():
        sae.b_enc.clamp_(max=0.0)
        sae.b_dec.zero_()
    bad = torch.tensor([0.0, 3.0, 0.0, -4.0, 0.0, 0.0])
    x[17] = bad
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.training_loss(torch.randn(20, 6), state=TrainState()).loss.backward()
    opt.step()
    with torch.no_grad():
        sae.b_enc.clamp_(max=0.0)
        sae.b_dec.zero_()
    alive_norm = sae.W_enc[:, ~dead].norm(dim=0).mean().detach()
    assert abs(num(alive_norm) - 1.0) > 0.05  # so the 0.2 x mean-alive-norm rule is actually exercised
    n = sae.resample_dead_latents(x, dead, opt, generator=torch.Generator().manual_seed(0))
    assert n == 3
    direction = bad / bad.norm()
    for i in (1, 4, 7):
        assert torch.allclose(sae.W_dec[i], direction, atol=1e-6)
        assert torch.allclose(sae.W_enc[:, i], 0.2 * alive_norm * direction, atol=1e-6)
        assert num(sae.b_enc[i]) == 0.0
        for p, row in ((sae.W_enc, sae.W_enc[:, i]), (sae.b_enc, None), (sae.W_dec, sae.W_dec[i])):
            state = opt.state[p]
            if p is sae.W_enc:
                assert num(state["exp_avg"][:, i].abs().sum()) == 0 and num(state["exp_avg_sq"][:, i].abs().sum()) == 0
            else:
                assert num(state["exp_avg"][i].abs().sum()) == 0 and num(state["exp_avg_sq"][i].abs().sum()) == 0
    # alive latents keep their optimiser state
    assert num(opt.state[sae.W_dec]["exp_avg_sq"][0].abs().sum()) > 0
    # the resampled latents now fire on the input they were built from
    assert bool((sae.encode(bad[None])[0, [1, 4, 7]] > 0).all())


def test_resampling_prefers_inputs_with_large_loss():
    sae, dead = _classic_with_dead_latents()
    g = torch.Generator().manual_seed(1)
    x = 0.01 * torch.randn(400, 6, generator=g)
    x[:4] = 10 * torch.randn(4, 6, generator=g)  # four inputs with enormous reconstruction error
    sae.resample_dead_latents(x, dead, generator=torch.Generator().manual_seed(2))
    picked = sae.W_dec[dead]
    targets = x[:4] / x[:4].norm(dim=1, keepdim=True)
    # every resampled decoder row is one of the four high-loss inputs
    assert bool(((picked @ targets.T).max(dim=1).values > 1 - 1e-5).all())


def test_resampling_without_dead_latents_is_a_no_op_and_april_refuses():
    sae, _ = _classic_with_dead_latents()
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    assert sae.resample_dead_latents(batch(10, d=6), torch.zeros(10, dtype=torch.bool)) == 0
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items())
    with pytest.raises(SaeforgeError, match="classic"):
        build("relu_april").resample_dead_latents(batch(10), torch.ones(D_SAE, dtype=torch.bool))
    with pytest.raises(SaeforgeError, match="dead_mask"):
        sae.resample_dead_latents(batch(10, d=6), torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("every, total, due", [
    (150, 300, [149]),                           # the report: resampling at the final step 299 is gone
    (10, 40, [9, 19, 29]),                       # window max(5, 2) = 5 steps: 39 is the final step
    (10, 1000, list(range(9, 950, 10))),         # window max(5, 50) = 50 steps: the last is after step 950
    (100, 150, [99]),                            # 50 steps left after it: exactly the window, so still due
    (100, 140, []),                              # 40 steps left: inside the window of 50
    (0, 100, []),
    (None, 100, []),
])
def test_resampling_is_due_every_interval_but_never_in_the_settling_window(every, total, due):
    from saeforge.saes.relu import resample_due

    assert [s for s in range(total) if resample_due(s, total, every)] == due


def test_classic_after_step_resamples_only_when_due():
    sae = build("relu_classic", resample_every=4)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:3] = True
    x = batch(64)
    before = sae.W_dec.detach().clone()
    sae.after_step(7, 8, dead, x, None)  # the final step: never
    assert torch.equal(sae.W_dec, before)
    sae.after_step(3, 100, dead, x, None)
    assert not torch.equal(sae.W_dec[:3], before[:3]) and torch.equal(sae.W_dec[3:], before[3:])
