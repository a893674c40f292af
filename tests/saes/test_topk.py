"""TopK SAE: exact k per token, AuxK formula and gradient routing, config validation, kernel options."""

from __future__ import annotations

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.saes import TopKConfig, TrainState

from .helpers import D_IN, D_SAE, batch, build, num


def test_exactly_k_latents_per_token():
    sae = build("topk", k=5)
    f = sae.encode(batch(100))
    assert bool(((f > 0).sum(1) == 5).all())
    # they are the k largest pre-activations
    pre = torch.relu((batch(100) - sae.b_dec) @ sae.W_enc + sae.b_enc)
    top = pre.topk(5, dim=1)
    assert torch.allclose(f.gather(1, top.indices), top.values)


def test_defaults():
    cfg = TopKConfig(d_in=64, d_sae=256, k=8)
    assert cfg.apply_b_dec_to_input is True
    assert cfg.aux_k == 32 and cfg.auxk_coefficient == 1 / 32
    assert cfg.dead_after_tokens == 10_000_000 and cfg.kernel == "fast" and cfg.matmul_dtype is None
    assert TopKConfig(d_in=64, d_sae=20, k=8).aux_k == 20  # capped at d_sae


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 33}, "k=33 is larger than d_sae=32"),
    ({"k": 0}, "k must be a positive integer"),
    ({"k": 2.5}, "k must be a positive integer"),
    ({"k": 4, "aux_k": 40}, "aux_k"),
    ({"k": 4, "auxk_coefficient": -1.0}, "auxk_coefficient"),
    ({"k": 4, "kernel": "triton"}, "unknown kernel"),
    ({"k": 4, "matmul_dtype": "int8"}, "matmul_dtype"),
    ({"k": 4, "dead_after_tokens": 0}, "dead_after_tokens"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(SaeforgeError, match=match):
        TopKConfig(d_in=D_IN, d_sae=D_SAE, **kwargs)


def test_k_is_required():
    with pytest.raises(TypeError):
        TopKConfig(d_in=D_IN, d_sae=D_SAE)  # type: ignore[call-arg]


def test_auxk_is_zero_without_dead_latents():
    sae = build("topk")
    x = batch(64)
    assert num(sae.training_loss(x, state=TrainState()).terms["auxk"]) == 0.0
    none_dead = torch.zeros(D_SAE, dtype=torch.bool)
    assert num(sae.training_loss(x, state=TrainState(dead_mask=none_dead)).terms["auxk"]) == 0.0


def _dense_auxk(sae, x, dead, aux_k):
    """AuxK recomputed densely from its definition (module docstring of saeforge.saes.topk)."""
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    top = pre.topk(sae.cfg.k, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    x_hat = z @ sae.W_dec + sae.b_dec
    e = x - x_hat
    masked = pre.masked_fill(~dead, float("-inf"))
    aux = masked.topk(aux_k, dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, aux.indices, torch.relu(aux.values))
    e_hat = z_aux @ sae.W_dec
    nmse = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return sae.cfg.auxk_coefficient * nmse * (x - x.mean(0)).pow(2).sum(1).mean()


@pytest.mark.parametrize("kernel", ["fast", "reference"])
def test_auxk_matches_its_definition(kernel):
    sae = build("topk", aux_k=3, auxk_coefficient=0.5, kernel=kernel)
    x = batch(64)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[0, 5, 9, 20, 31]] = True
    got = sae.training_loss(x, state=TrainState(dead_mask=dead)).terms["auxk"]
    assert num(got) > 0
    assert torch.allclose(got, _dense_auxk(sae, x, dead, 3), rtol=1e-5)
    # fewer dead latents than aux_k: all of them are used
    few = torch.zeros(D_SAE, dtype=torch.bool)
    few[[2, 3]] = True
    got = sae.training_loss(x, state=TrainState(dead_mask=few)).terms["auxk"]
    assert torch.allclose(got, _dense_auxk(sae, x, few, 2), rtol=1e-5)


def test_auxk_gradient_reaches_only_dead_latents():
    sae = build("topk", aux_k=3)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 2, 8, 30]] = True
    out = sae.training_loss(batch(64), state=TrainState(dead_mask=dead))
    out.terms["auxk"].backward()
    assert sae.W_enc.grad[:, dead].abs().sum() > 0 and sae.W_dec.grad[dead].abs().sum() > 0
    assert num(sae.W_enc.grad[:, ~dead].abs().sum()) == 0
    assert num(sae.W_dec.grad[~dead].abs().sum()) == 0
    assert num(sae.b_enc.grad[~dead].abs().sum()) == 0


def test_fast_and_reference_kernels_agree():
    x = batch(64)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::4] = True
    outs = []
    for kernel in ("fast", "reference"):
        sae = build("topk", kernel=kernel)
        out = sae.training_loss(x, state=TrainState(dead_mask=dead))
        out.loss.backward()
        outs.append((out, sae.W_enc.grad.clone()))
    (a, ga), (b, gb) = outs
    assert torch.allclose(a.loss, b.loss, rtol=1e-5) and torch.allclose(a.x_hat, b.x_hat, atol=1e-5)
    assert torch.allclose(ga, gb, atol=1e-5)


def test_bfloat16_matmul_is_close_to_float32():
    x = batch(64)
    full = build("topk").training_loss(x, state=TrainState())
    half = build("topk", matmul_dtype="bfloat16").training_loss(x, state=TrainState())
    assert half.x_hat.dtype == torch.float32
    assert torch.allclose(full.terms["mse"], half.terms["mse"], rtol=0.05)


def test_fired_and_l0_come_from_the_selection():
    sae = build("topk", k=3)
    x = batch(5)
    out = sae.training_loss(x, state=TrainState())
    f = sae.encode(x)
    assert out.l0 == pytest.approx(3.0)
    assert torch.equal(out.fired, (f > 0).any(0))


def test_saelens_view():
    sae = build("topk", k=4)
    assert sae.saelens_architecture() == "topk"
    assert sae.saelens_config_extras() == {"k": 4, "rescale_acts_by_decoder_norm": False}
    assert set(sae.saelens_tensors()) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert sae.extra_tensors() == {}



# ---- the fast path's buffers reused from step to step (saeforge.kernels.buffers) ----

def _train_steps(sae, xs, dead_mask):
    """Whole training steps as the trainer takes them; the losses and the final parameters."""
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    losses = []
    for step, x in enumerate(xs):
        out = sae.training_loss(x, state=TrainState(step=step, dead_mask=dead_mask))
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
        opt.zero_grad(set_to_none=True)
        losses.append((out.loss.detach().clone(), out.x_hat.detach().clone()))
    return losses, {n: p.detach().clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("matmul_dtype", [None, "bfloat16"])
def test_steps_through_reused_buffers_are_bit_identical_to_fresh_tensors(monkeypatch, arch, matmul_dtype):
    """The buffers change where results are written, never a bit of them: four steps (AuxK on: half the latents
    dead) against the same steps with every buffer off (fresh tensors, the base class's projection, autograd's
    squared error); the compiled projection, which rounds differently, is off in both (tested on its own)."""
    from saeforge.kernels import native
    from saeforge.saes.topk import TopKSAE

    monkeypatch.setattr(native, "project_rows_", lambda g, W: False)

    d_in, d_sae = 64, 512  # large enough for the compiled kernels (k at most one per 16 latents)
    overrides = {"group_sizes": (64, 448)} if arch == "matryoshka" else {}
    xs = [batch(256, d_in, seed=s) for s in range(4)]
    dead = torch.arange(d_sae) % 2 == 0
    buffered = build(arch, d_in=d_in, d_sae=d_sae, k=8, matmul_dtype=matmul_dtype, **overrides)
    fresh = build(arch, d_in=d_in, d_sae=d_sae, k=8, matmul_dtype=matmul_dtype, **overrides)
    got = _train_steps(buffered, xs, dead)
    assert buffered._step_buffers._buffers  # the buffers were in use
    monkeypatch.setattr(TopKSAE, "_step_buffers", property(lambda self: None))
    expected = _train_steps(fresh, xs, dead)
    for (loss_a, x_hat_a), (loss_b, x_hat_b) in zip(got[0], expected[0]):
        assert torch.equal(loss_a, loss_b) and torch.equal(x_hat_a, x_hat_b)
    for name in expected[1]:
        assert torch.equal(got[1][name], expected[1][name]), name


def test_gradients_land_in_reused_buffers_and_a_held_gradient_is_never_overwritten():
    from saeforge.kernels import native

    sae = build("topk", d_in=64, d_sae=512, k=8)
    x1, x2 = batch(256, 64, seed=1), batch(256, 64, seed=2)
    sae.training_loss(x1, state=TrainState()).loss.backward()
    first = {n: p.grad.data_ptr() for n, p in sae.named_parameters() if p.dim() == 2}
    held, kept = sae.W_dec.grad, sae.W_dec.grad.clone()
    sae.zero_grad(set_to_none=True)
    sae.training_loss(x2, state=TrainState()).loss.backward()
    assert torch.equal(held, kept)  # someone held it: the step wrote elsewhere
    assert sae.W_dec.grad.data_ptr() != held.data_ptr()
    del held
    sae.zero_grad(set_to_none=True)
    sae.training_loss(x1, state=TrainState()).loss.backward()
    if native.available():  # the compiled backward writes the weight gradients into the same memory every step
        assert {n: p.grad.data_ptr() for n, p in sae.named_parameters() if p.dim() == 2} == first
    # zero_grad(set_to_none=False): the .grad holds the buffer, so the next backward's gradient is added to it
    once = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.training_loss(x1, state=TrainState()).loss.backward()
    for n, p in sae.named_parameters():
        assert torch.equal(p.grad, 2 * once[n]), n


def test_the_buffered_squared_error_and_projection_give_autograds_and_the_base_classs_bits(monkeypatch):
    from saeforge.kernels import native
    from saeforge.saes.base import SAE
    from saeforge.saes.topk import _SquaredErrorFn

    x_hat, target = torch.randn(300, 77, requires_grad=True), torch.randn(300, 77, requires_grad=True)
    sae = build("topk", d_in=77, d_sae=333, k=8)
    loss = _SquaredErrorFn.apply(x_hat, target, sae._step_buffers)
    plain = (x_hat - target).pow(2).sum(-1).mean()
    assert torch.equal(loss, plain)
    g = torch.tensor(0.37)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(loss, (x_hat, target), g),
                                                 torch.autograd.grad(plain, (x_hat, target), g)))
    with torch.no_grad():
        sae.W_dec.mul_(2 * torch.rand(333, 1))  # rows off the unit sphere: the projection normalises them itself
    grad = torch.randn(333, 77)
    sae.W_dec.grad = grad.clone()
    monkeypatch.setattr(native, "project_rows_", lambda g, W: False)  # the buffered PyTorch ops, not the kernel
    sae.before_optimizer_step()
    got = sae.W_dec.grad.clone()
    sae.W_dec.grad = grad.clone()
    SAE.before_optimizer_step(sae)
    assert torch.equal(got, sae.W_dec.grad)


@pytest.mark.parametrize("matmul_dtype", [None, "bfloat16"])
def test_two_forwards_before_one_backward_keep_their_own_saved_tensors(monkeypatch, matmul_dtype):
    """The second forward must not write into buffers the first one's graph still holds (x - b_dec, the casts)."""
    from saeforge.saes.topk import TopKSAE

    xs = [batch(256, 64, seed=s) for s in (1, 2)]

    def grads():
        sae = build("topk", d_in=64, d_sae=512, k=8, matmul_dtype=matmul_dtype)
        sum(sae.training_loss(x, state=TrainState()).loss for x in xs).backward()
        return [p.grad for p in sae.parameters()]

    got = grads()
    monkeypatch.setattr(TopKSAE, "_step_buffers", property(lambda self: None))
    assert all(torch.equal(a, b) for a, b in zip(got, grads()))


def test_fast_kernel_projects_the_decoder_gradient_with_the_compiled_pass():
    """kernel="fast": the one-pass compiled projection where it is built (held to its error bound in
    tests/kernels); "reference" (or no compiler): the plain-PyTorch projection of the base class, bit for bit."""
    from saeforge.kernels import native
    from saeforge.saes.base import SAE

    for kernel in ("fast", "reference"):
        sae = build("topk", kernel=kernel)
        sae.training_loss(batch(64), state=TrainState()).loss.backward()
        g = sae.W_dec.grad.clone()
        sae.before_optimizer_step()
        got = sae.W_dec.grad.clone()
        expected = g.clone()
        if not (kernel == "fast" and native.project_rows_(expected, sae.W_dec.detach())):
            sae.W_dec.grad = g
            SAE.before_optimizer_step(sae)
            expected = sae.W_dec.grad
        assert torch.equal(got, expected), kernel
        assert (got * sae.W_dec).sum(1).abs().max() < 1e-5
