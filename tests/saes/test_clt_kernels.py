"""The CLT's fast training path: its decode and per-layer views against plain autograd, and the reused buffers —
reused across steps, never overwriting what someone still holds, accumulating when .grad is kept."""

from __future__ import annotations

import copy

import pytest
import torch

from saeforge.kernels import decode_sparse_blocks, encode_topk
from saeforge.saes import TopKCLTConfig, TrainState, make_sae
from saeforge.saes.clt_kernels import StepBuffers, cat_into_buffer, decode_into_layers, layer_views

L, D_IN, D_OUT, F = 3, 8, 6, 16


def latents(n: int = 40, k: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W_enc, b_enc = torch.randn(D_IN, F, generator=g), torch.randn(F, generator=g)
    lat, _ = encode_topk(torch.randn(n, D_IN, generator=g), W_enc, b_enc, k=k)
    return lat


@pytest.mark.parametrize("blocks", [1, 3])
def test_decode_into_layers_matches_decode_sparse_blocks(blocks):
    lat = latents()
    W = torch.randn(F, blocks, D_OUT, requires_grad=True)
    values = lat.values.detach().requires_grad_()
    lat = lat._replace(values=values)
    weights = [torch.randn(lat.shape[0], D_OUT) for _ in range(blocks)]
    grads = []
    for fast in (True, False):
        if fast:
            outs = decode_into_layers(lat, W, StepBuffers(), "W")
        else:
            outs = decode_sparse_blocks(lat, W, impl="reference")
        grads.append(torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), (values, W)))
        if fast:
            dense = torch.zeros(lat.shape).index_put((lat.rows, lat.cols), values.detach())
            for b, o in enumerate(outs):
                assert torch.allclose(o, dense @ W.detach()[:, b], atol=1e-5)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_layer_views_and_cat_into_buffer_differentiate_as_unbind_and_cat():
    P = torch.randn(L, D_IN, F, requires_grad=True)
    weights = [torch.randn(D_IN, F) for _ in range(L)]
    (fast,) = torch.autograd.grad(sum((v * w).sum() for v, w in zip(layer_views(P, StepBuffers(), "P"), weights)), P)
    (plain,) = torch.autograd.grad(sum((v * w).sum() for v, w in zip(P.unbind(0), weights)), P)
    assert torch.equal(fast, plain) and fast.is_contiguous()
    parts = [torch.randn(5, D_OUT, requires_grad=True) for _ in range(L)]
    w = torch.randn(5, L * D_OUT)
    y = cat_into_buffer(parts, StepBuffers(), "y")
    assert torch.equal(y, torch.cat(parts, 1))
    for g, p in zip(torch.autograd.grad((y * w).sum(), parts), w.split(D_OUT, 1)):
        assert torch.equal(g, p)


def clt_pair():
    torch.manual_seed(0)
    fast = make_sae(TopKCLTConfig(d_in=L * D_IN, d_sae=L * F, d_out=L * D_OUT, n_layers=L, k=3, skip_connection=True))
    with torch.no_grad():
        fast.W_skip.copy_(0.2 * torch.randn(fast.W_skip.shape))
    ref = copy.deepcopy(fast)
    object.__setattr__(ref.cfg, "kernel", "reference")
    return fast, ref


def batch(seed: int, dead: bool = True):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(L * F, dtype=torch.bool)
    mask[seed % 4::4] = dead
    return torch.randn(32, L * D_IN, generator=g), torch.randn(32, L * D_OUT, generator=g), TrainState(dead_mask=mask)


def grads_of(sae, x, y, state):
    sae.zero_grad(set_to_none=True)
    sae.training_loss(x, y, state=state).loss.backward()
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-5), n


@pytest.mark.parametrize("dead", [False, True])
def test_buffers_are_reused_across_steps_and_the_gradients_stay_right(dead):
    fast, ref = clt_pair()
    ptrs = []
    for seed in range(3):
        x, y, state = batch(seed, dead)
        assert_same(grads_of(fast, x, y, state), grads_of(ref, x, y, state))
        ptrs.append({n: p.grad.data_ptr() for n, p in fast.named_parameters()})
    # the stacked parameters' gradients land in the same memory every step, and so do the decoders' unless AuxK
    # decodes through them too (its part and the main part are summed by autograd, into either)
    for name in ("W_enc", "b_enc", "b_dec", "W_skip") + (() if dead else ("W_dec.0", "W_dec.1", "W_dec.2")):
        assert ptrs[0][name] == ptrs[1][name] == ptrs[2][name], name


def test_a_gradient_or_prediction_someone_holds_is_never_overwritten():
    fast, ref = clt_pair()
    x, y, state = batch(0)
    out = fast.training_loss(x, y, state=state)
    out.loss.backward()
    held = {n: p.grad for n, p in fast.named_parameters()}
    held_copy = {n: g.clone() for n, g in held.items()}
    y_hat, y_hat_copy = out.x_hat, out.x_hat.detach().clone()
    fast.zero_grad(set_to_none=True)
    x2, y2, state2 = batch(1)
    fast.training_loss(x2, y2, state=state2).loss.backward()
    for n in held:
        assert torch.equal(held[n], held_copy[n]), n
    assert torch.equal(y_hat.detach(), y_hat_copy)
    assert_same({n: p.grad for n, p in fast.named_parameters()}, grads_of(ref, x2, y2, state2))
    # gradients handed out by torch.autograd.grad are not overwritten either
    params = list(fast.parameters())
    first = torch.autograd.grad(fast.training_loss(x, y, state=state).loss, params)
    first_copy = [g.clone() for g in first]
    torch.autograd.grad(fast.training_loss(x2, y2, state=state2).loss, params)
    for a, b in zip(first, first_copy):
        assert torch.equal(a, b)


def test_gradients_accumulate_over_backward_calls_without_zero_grad():
    fast, ref = clt_pair()
    (x, y, s), (x2, y2, s2) = batch(0), batch(1)
    expected = {n: a + b for (n, a), b in zip(grads_of(ref, x, y, s).items(), grads_of(ref, x2, y2, s2).values())}
    fast.zero_grad(set_to_none=True)
    fast.training_loss(x, y, state=s).loss.backward()
    fast.training_loss(x2, y2, state=s2).loss.backward()
    assert_same({n: p.grad for n, p in fast.named_parameters()}, expected)
