"""Behaviour every architecture shares: shapes, loss terms, optimiser hooks, folding, config round trips."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.saes import SAEConfig, TrainState, make_sae

from .helpers import D_IN, D_SAE, TOPK_FAMILY, batch, build, config_for, num

EXPECTED_TERMS = {
    "relu_april": {"mse", "l1"},
    "relu_classic": {"mse", "l1"},
    "topk": {"mse", "auxk"},
    "batchtopk": {"mse", "auxk"},
    "matryoshka": {"mse_prefix_4", "mse_prefix_16", "mse", "auxk"},
    "gated": {"mse", "l1", "aux"},
    "jumprelu": {"mse", "l0"},
}
# Architectures whose training forward is their inference forward (BatchTopK-style ones select over the batch).
SAME_FORWARD = {"relu_april", "relu_classic", "topk", "gated", "jumprelu"}


def test_shapes(variant):
    sae = build(variant)
    x = batch(10)
    f = sae.encode(x)
    assert f.shape == (10, D_SAE)
    assert sae.decode(f).shape == (10, D_IN)
    assert torch.equal(sae(x), sae.decode(sae.encode(x)))
    # extra leading dimensions are flattened and restored
    x3 = x.reshape(2, 5, D_IN)
    assert sae.encode(x3).shape == (2, 5, D_SAE)
    assert sae(x3).shape == (2, 5, D_IN)
    if variant != "batchtopk" and variant != "matryoshka":  # their threshold makes encode per-token too
        assert torch.allclose(sae.encode(x3).reshape(10, D_SAE), f)


def test_latents_are_non_negative_and_sparse(variant):
    sae = build(variant)
    f = sae.encode(batch(50))
    assert bool((f >= 0).all())
    if variant in TOPK_FAMILY - {"batchtopk", "matryoshka"}:
        assert bool(((f > 0).sum(1) <= 4).all())


def test_encode_rejects_wrong_width(variant):
    sae = build(variant)
    with pytest.raises(SaeforgeError, match="last dimension 5"):
        sae.encode(torch.randn(3, 5))


def test_training_loss_terms_and_outputs(variant):
    sae = build(variant)
    x = batch(64)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    out = sae.training_loss(x, state=TrainState(step=5, sparsity_scale=0.5, dead_mask=dead))
    assert set(out.terms) == EXPECTED_TERMS[variant]
    assert out.loss.dim() == 0 and all(t.dim() == 0 for t in out.terms.values())
    assert torch.allclose(out.loss, sum(out.terms.values()))
    assert out.x_hat.shape == (64, D_IN)
    assert out.fired.dtype == torch.bool and out.fired.shape == (D_SAE,)
    assert isinstance(out.l0, float) and out.l0 > 0
    if variant in SAME_FORWARD:
        f = sae.encode(x)
        assert torch.allclose(out.x_hat, sae.decode(f), atol=1e-5)
        assert torch.equal(out.fired, (f > 0).any(0))
        assert out.l0 == pytest.approx(num((f > 0).sum(1).float().mean()))
    out.loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert sae.W_enc.grad.abs().sum() > 0 and sae.W_dec.grad.abs().sum() > 0


def test_mse_term_is_squared_error_summed_over_features(variant):
    sae = build(variant)
    x = batch(32)
    out = sae.training_loss(x, state=TrainState())
    expected = (out.x_hat - x).pow(2).sum(1).mean()
    assert torch.allclose(out.terms["mse"], expected)


@pytest.mark.parametrize("variant, penalty", [("relu_april", "l1"), ("relu_classic", "l1"), ("gated", "l1"),
                                              ("jumprelu", "l0")])  # TopK-style SAEs have no sparsity coefficient
def test_sparsity_scale_multiplies_the_penalty(variant, penalty):
    sae = build(variant)
    x = batch(32)
    full = sae.training_loss(x, state=TrainState(sparsity_scale=1.0)).terms[penalty]
    quarter = sae.training_loss(x, state=TrainState(sparsity_scale=0.25)).terms[penalty]
    assert num(full) > 0
    assert torch.allclose(quarter, 0.25 * full)


def test_transcoder_needs_target_and_uses_it(variant):
    sae = build(variant, d_out=7)
    assert sae.cfg.apply_b_dec_to_input is False  # b_dec lives in the output space, whatever the default
    assert sae.W_dec.shape == (D_SAE, 7) and sae.b_dec.shape == (7,)
    x, target = batch(16), batch(16, d=7, seed=5)
    with pytest.raises(SaeforgeError, match="needs a target"):
        sae.training_loss(x, state=TrainState())
    out = sae.training_loss(x, target, state=TrainState())
    assert out.x_hat.shape == (16, 7)
    assert torch.allclose(out.terms["mse"], (out.x_hat - target).pow(2).sum(1).mean())
    assert sae(x).shape == (16, 7)


def test_unit_norm_decoder_hooks(variant):
    sae = build(variant)
    unit = variant != "relu_april"
    assert sae.unit_norm_decoder is unit
    norms = sae.W_dec.norm(dim=1)
    if unit:
        assert torch.allclose(norms, torch.ones(D_SAE), atol=1e-6)
    else:
        assert torch.allclose(norms, torch.full((D_SAE,), 0.1), atol=1e-6)
    opt = torch.optim.SGD(sae.parameters(), lr=0.5)
    sae.training_loss(batch(64), state=TrainState()).loss.backward()
    grad_before = sae.W_dec.grad.clone()
    sae.before_optimizer_step()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
    if unit:
        assert parallel.abs().max() < 1e-5
        assert not torch.allclose(grad_before, sae.W_dec.grad)
    else:
        assert torch.equal(grad_before, sae.W_dec.grad)
    opt.step()
    sae.after_optimizer_step()
    norms = sae.W_dec.norm(dim=1)
    if unit:
        assert torch.allclose(norms, torch.ones(D_SAE), atol=1e-6)
    else:
        assert not torch.allclose(norms, torch.full((D_SAE,), 0.1), atol=1e-4)


def test_tied_initialisation(variant):
    sae = make_sae(config_for(variant))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert num(sae.b_dec.abs().sum()) == 0


def test_fold_decoder_norms_keeps_the_function(variant):
    sae = build(variant)
    x = batch(40)
    if variant in TOPK_FAMILY:
        # Unit rows (kept so by training): nothing to fold, nothing changes.
        before_f, before_out = sae.encode(x), sae(x)
        sae.fold_decoder_norms()
        assert torch.equal(sae.encode(x), before_f) and torch.equal(sae(x), before_out)
        # Non-unit rows cannot be folded without changing which latents win: refused.
        with torch.no_grad():
            sae.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE)[:, None])
        with pytest.raises(SaeforgeError, match="not unit norm"):
            sae.fold_decoder_norms()
        return
    with torch.no_grad():
        scale = torch.linspace(0.3, 3.0, D_SAE)
        sae.W_dec.mul_(scale[:, None])
    norms = sae.W_dec.norm(dim=1).detach().clone()
    f_before, out_before = sae.encode(x).detach(), sae(x).detach()
    sae.fold_decoder_norms()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-6)
    assert torch.allclose(sae(x), out_before, atol=1e-5)
    assert torch.allclose(sae.encode(x), f_before * norms, atol=1e-5)


@pytest.mark.parametrize("scale", [0.25, 7.0])
def test_fold_input_scale(variant, scale):
    sae = build(variant)
    x = 3.0 * batch(40)
    trained = copy.deepcopy(sae)
    sae.fold_input_scale(scale)
    # the folded SAE on raw x == the trained SAE on scaled x, mapped back to raw units
    assert torch.allclose(sae(x), trained(x * scale) / scale, rtol=1e-5, atol=1e-5)
    assert torch.allclose(sae.encode(x), trained.encode(x * scale) / scale, rtol=1e-5, atol=1e-5)
    # decoder rows are untouched (unit norm stays unit norm)
    assert torch.equal(sae.W_dec, trained.W_dec)


def test_fold_input_scale_transcoder_with_two_scales(variant):
    sae = build(variant, d_out=7)
    trained = copy.deepcopy(sae)
    x = batch(30)
    s_in, s_out = 4.0, 0.5
    sae.fold_input_scale(s_in, s_out)
    assert torch.allclose(sae(x), trained(x * s_in) / s_out, rtol=1e-5, atol=1e-5)


def test_fold_input_scale_refuses_two_scales_with_b_dec_subtraction():
    sae = build("topk")
    assert sae.cfg.apply_b_dec_to_input
    with pytest.raises(SaeforgeError, match="must be equal"):
        sae.fold_input_scale(2.0, 3.0)
    with pytest.raises(SaeforgeError, match="positive"):
        sae.fold_input_scale(0.0)


def test_config_round_trip(variant):
    cfg = config_for(variant)
    d = cfg.to_dict()
    json.dumps(d)
    assert d["architecture"] == cfg.architecture
    assert SAEConfig.from_dict(d) == cfg
    assert type(cfg).from_dict(d) == cfg
    assert SAEConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_init_from_data_sets_b_dec(variant):
    sae = make_sae(config_for(variant))
    x = batch(200) + 5.0
    sae.init_from_data(x)
    if sae.cfg.b_dec_init == "zeros":
        assert variant == "relu_april"  # the April update keeps both biases at zero
        assert num(sae.b_dec.abs().sum()) == 0
    else:
        assert sae.cfg.b_dec_init == "geometric_median"
        assert torch.allclose(sae.b_dec, torch.full((D_IN,), 5.0), atol=0.3)


def test_bfloat16_parameters(variant):
    sae = build(variant, dtype="bfloat16")
    assert sae.W_enc.dtype == torch.bfloat16
    out = sae.training_loss(batch(32), state=TrainState())
    assert out.x_hat.dtype == torch.bfloat16
    out.loss.backward()
    assert sae.encode(batch(4)).dtype == torch.bfloat16
