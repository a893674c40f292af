"""JumpReLU: the straight-through pseudo-gradients (arXiv 2407.14435) on hand-checked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.saes import JumpReLUConfig, TrainState, make_sae
from saeforge.saes.jumprelu import JumpReLUFunction, StepFunction, rectangle

from .helpers import num

# θ = 0.5, ε = 0.1: (z - θ)/ε = [-2, 0.3, 4, -0.3]  ->  K = [0, 1, 0, 1]
Z = [0.3, 0.53, 0.9, 0.47]
THETA, EPS = 0.5, 0.1
UPSTREAM = [1.0, 2.0, 3.0, 4.0]


def _inputs():
    z = torch.tensor([Z], dtype=torch.float64, requires_grad=True)
    theta = torch.full((4,), THETA, dtype=torch.float64, requires_grad=True)
    return z, theta


def test_jumprelu_forward_and_pseudo_gradients():
    z, theta = _inputs()
    out = JumpReLUFunction.apply(z, theta, EPS)
    assert out.tolist() == [[0.0, 0.53, 0.9, 0.0]]
    out.backward(torch.tensor([UPSTREAM], dtype=torch.float64))
    # ∂/∂z = H(z - θ): only the active entries pass their upstream gradient
    assert z.grad.tolist() == [[0.0, 2.0, 3.0, 0.0]]
    # ∂/∂θ = -(θ/ε) K((z-θ)/ε) · upstream = -5 · [0, 2, 0, 4]
    assert torch.allclose(theta.grad, torch.tensor([0.0, -10.0, 0.0, -20.0], dtype=torch.float64))


def test_step_forward_and_pseudo_gradients():
    z, theta = _inputs()
    out = StepFunction.apply(z, theta, EPS)
    assert out.tolist() == [[0.0, 1.0, 1.0, 0.0]]
    out.backward(torch.tensor([UPSTREAM], dtype=torch.float64))
    # ∂H/∂z = 0; ∂H/∂θ = -(1/ε) K · upstream = -10 · [0, 2, 0, 4]
    assert z.grad.tolist() == [[0.0, 0.0, 0.0, 0.0]]
    assert torch.allclose(theta.grad, torch.tensor([0.0, -20.0, 0.0, -40.0], dtype=torch.float64))


def test_theta_gradient_sums_over_the_batch():
    z = torch.tensor([Z, Z], dtype=torch.float64)
    theta = torch.full((4,), THETA, dtype=torch.float64, requires_grad=True)
    StepFunction.apply(z, theta, EPS).sum().backward()
    assert torch.allclose(theta.grad, torch.tensor([0.0, -20.0, 0.0, -20.0], dtype=torch.float64))


def test_rectangle_is_the_open_unit_interval():
    u = torch.tensor([-0.5, -0.4999, 0.0, 0.4999, 0.5, 0.75], dtype=torch.float64)
    assert rectangle(u).tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_l0_term_gradient_reaches_log_threshold_through_exp():
    cfg = JumpReLUConfig(d_in=2, d_sae=3, bandwidth=EPS, threshold_init=THETA, l0_coefficient=2.0,
                         dtype="float64")
    sae = make_sae(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2, 3, dtype=torch.float64))
        sae.b_enc.zero_()
    # pre-activations = x (latent 2 gets 0): latent 0 at 0.53 (in the window), latent 1 at 0.9 (outside)
    x = torch.tensor([[0.53, 0.9], [0.47, 0.2]], dtype=torch.float64)
    out = sae.training_loss(x, state=TrainState(sparsity_scale=0.5))
    # row 0 has two active latents (0.53, 0.9 > θ), row 1 none: mean L0 = 1, term = λ · s · 1
    assert out.terms["l0"].item() == pytest.approx(2.0 * 0.5 * 1.0)
    sae.log_threshold.grad = None
    out.terms["l0"].backward()
    # d/dlogθ = θ · d/dθ = θ · λ·s · mean_batch(-(1/ε) K) ; latent 0 has K=1 in both rows, latent 1 in neither
    expected0 = THETA * 2.0 * 0.5 * (-(1 / EPS) * 2 / 2)
    assert torch.allclose(sae.log_threshold.grad, torch.tensor([expected0, 0.0, 0.0], dtype=torch.float64))


def test_inference_encode_is_a_hard_threshold():
    sae = make_sae(JumpReLUConfig(d_in=6, d_sae=10, threshold_init=0.4))
    x = torch.randn(30, 6)
    pre = x @ sae.W_enc + sae.b_enc
    assert torch.equal(sae.encode(x), pre * (pre > sae.threshold))
    assert bool(((sae.encode(x) == 0) | (sae.encode(x) > 0.4)).all())


def test_defaults_and_saelens_view():
    cfg = JumpReLUConfig(d_in=6, d_sae=10)
    assert cfg.apply_b_dec_to_input is False
    assert (cfg.bandwidth, cfg.threshold_init, cfg.pre_act_loss_coefficient) == (0.1, 1.0, 0.0)
    sae = make_sae(cfg)
    assert torch.allclose(sae.threshold, torch.full((10,), 1.0))
    assert sae.log_threshold.requires_grad
    tensors = sae.saelens_tensors()
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    assert torch.equal(tensors["threshold"], torch.exp(sae.log_threshold))
    assert set(sae.extra_tensors()) == {"log_threshold"}
    assert sae.saelens_architecture() == "jumprelu"
    assert make_sae(JumpReLUConfig(d_in=6, d_sae=10, d_out=4)).saelens_architecture() == "jumprelu_transcoder"


def test_pre_act_loss_pushes_dead_latents_towards_their_threshold():
    sae = make_sae(JumpReLUConfig(d_in=6, d_sae=10, threshold_init=0.5, pre_act_loss_coefficient=0.1))
    x = torch.randn(16, 6)
    dead = torch.zeros(10, dtype=torch.bool)
    dead[3] = True
    assert "pre_act" not in make_sae(JumpReLUConfig(d_in=6, d_sae=10)).training_loss(x, state=TrainState()).terms
    out = sae.training_loss(x, state=TrainState(dead_mask=dead))
    pre = x @ sae.W_enc + sae.b_enc
    expected = 0.1 * torch.relu(0.5 - pre[:, 3]).mean() * sae.W_dec[3].norm()
    assert torch.allclose(out.terms["pre_act"], expected, rtol=1e-5)
    out.terms["pre_act"].backward()
    assert num(sae.W_enc.grad[:, [0, 1, 2, 4, 5, 6, 7, 8, 9]].abs().sum()) == 0
    assert num(sae.b_enc.grad[3]) < 0  # raising b_enc[3] lowers the loss
    assert num(sae.training_loss(x, state=TrainState()).terms["pre_act"]) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"bandwidth": 0.0}, "bandwidth"),
    ({"threshold_init": -1.0}, "threshold_init"),
    ({"l0_coefficient": math.nan}, "l0_coefficient"),
    ({"pre_act_loss_coefficient": -1.0}, "pre_act_loss_coefficient"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(SaeforgeError, match=match):
        JumpReLUConfig(d_in=6, d_sae=10, **kwargs)
