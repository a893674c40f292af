"""Gated SAE: r_mag weight sharing, the frozen-decoder auxiliary loss, SAELens names."""

from __future__ import annotations

import torch

from saeforge.saes import TrainState

from .helpers import batch, build, num


def test_encode_matches_the_gated_formula():
    sae = build("gated")
    x = batch(20)
    x_tilde = x - sae.b_dec
    w_mag = sae.W_enc * torch.exp(sae.r_mag)[None, :]  # W_mag = W_gate diag(exp(r_mag))
    gate = (x_tilde @ sae.W_enc + sae.b_gate) > 0
    mag = torch.relu(x_tilde @ w_mag + sae.b_mag)
    assert torch.allclose(sae.encode(x), gate * mag, atol=1e-6)
    # the gate and the magnitude really differ (biases differ), so the test above can fail
    assert bool((gate & ~(mag > 0)).any() | (~gate & (mag > 0)).any())


def test_aux_term_does_not_train_the_decoder():
    sae = build("gated", apply_b_dec_to_input=False)
    out = sae.training_loss(batch(64), state=TrainState())
    out.terms["aux"].backward()
    assert sae.W_dec.grad is None or num(sae.W_dec.grad.abs().sum()) == 0
    assert sae.b_dec.grad is None or num(sae.b_dec.grad.abs().sum()) == 0
    # ...but it does train the gate path
    assert sae.W_enc.grad.abs().sum() > 0 and sae.b_gate.grad.abs().sum() > 0


def test_aux_term_is_reconstruction_from_relu_of_the_gate():
    sae = build("gated")
    x = batch(32)
    out = sae.training_loss(x, state=TrainState())
    gate_acts = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_gate)
    expected_aux = (gate_acts @ sae.W_dec + sae.b_dec - x).pow(2).sum(1).mean()
    assert torch.allclose(out.terms["aux"], expected_aux, rtol=1e-5)
    assert torch.allclose(out.terms["l1"], sae.cfg.l1_coefficient * gate_acts.sum(1).mean(), rtol=1e-5)


def test_main_loss_trains_the_decoder_and_magnitude_path():
    sae = build("gated")
    out = sae.training_loss(batch(64), state=TrainState())
    out.terms["mse"].backward()
    assert sae.W_dec.grad.abs().sum() > 0 and sae.r_mag.grad.abs().sum() > 0 and sae.b_mag.grad.abs().sum() > 0
    # the Heaviside gate passes no gradient to b_gate through the main reconstruction
    assert sae.b_gate.grad is None or num(sae.b_gate.grad.abs().sum()) == 0


def test_saelens_names():
    sae = build("gated")
    assert sae.saelens_architecture() == "gated"
    assert set(sae.saelens_tensors()) == {"W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"}
    assert not hasattr(sae, "b_enc")
