"""Cross-layer transcoders: per-layer encoders, decoders into the layer's own and every later output, causality,
the sparse kernels, folding per layer, saving, the memory statement, and ground truth across layers."""

from __future__ import annotations

import copy

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.evals.synthetic import SparseFeatureModel, mean_max_cosine
from saeforge.saes import (
    ActivationScaler,
    BatchTopKCLTConfig,
    DeadLatentTracker,
    JumpReLUCLTConfig,
    TopKCLTConfig,
    TrainState,
    clt_memory,
    load_sae,
    make_sae,
    save_sae,
)

L, D_IN, D_OUT, F = 3, 8, 6, 16


def config(code: str, **kw):
    base = dict(d_in=L * D_IN, d_sae=L * F, d_out=L * D_OUT, n_layers=L)
    if code == "topk":
        return TopKCLTConfig(**{**base, "k": 3, **kw})
    if code == "batchtopk":
        return BatchTopKCLTConfig(**{**base, "k": 3, **kw})
    return JumpReLUCLTConfig(**{**base, "bandwidth": 0.5, "threshold_init": 0.3, **kw})


def build(code: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    sae = make_sae(config(code, **kw))
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(sae.b_enc.shape))
        sae.b_dec.copy_(0.3 * torch.randn(sae.b_dec.shape))
        if code == "jumprelu":
            sae.log_threshold.copy_(torch.log(0.2 + 0.3 * torch.rand(sae.log_threshold.shape)))
        if code == "batchtopk":
            sae.threshold.copy_(torch.tensor([0.3, 0.5, 0.4]))
        if sae.cfg.skip_connection:
            sae.W_skip.copy_(0.2 * torch.randn(sae.W_skip.shape))
    return sae


@pytest.fixture(params=["topk", "batchtopk", "jumprelu"])
def code(request) -> str:
    return request.param


def test_layers_encode_and_decode_on_their_own(code):
    sae = build(code, skip_connection=True)
    x = torch.randn(20, L * D_IN)
    xs = x.reshape(20, L, D_IN)
    f = sae.encode(x)
    per_layer = [sae.encode_layer(i, xs[:, i]) for i in range(L)]
    assert torch.equal(f, torch.cat(per_layer, 1))
    out = sae.decode(f)
    for j in range(L):
        assert torch.allclose(out[:, j * D_OUT:(j + 1) * D_OUT], sae.decode_layer(j, per_layer), atol=1e-5)
        # layer j's output is Σ_{i <= j} f_i W_dec[i][:, j - i] + b_dec[j]: written out by hand
        by_hand = sum(per_layer[i] @ sae.W_dec[i][:, j - i] for i in range(j + 1)) + sae.b_dec[j]
        assert torch.allclose(sae.decode_layer(j, per_layer), by_hand, atol=1e-5)
    skip = torch.cat([xs[:, i] @ sae.W_skip[i].T for i in range(L)], 1)
    assert torch.allclose(sae(x), out + skip, atol=1e-5)
    assert f.shape == (20, L * F) and (f >= 0).all()
    if code == "topk":
        assert ((f.reshape(20, L, F) > 0).sum(2) <= 3).all()


def test_a_layer_never_sees_later_layers(code):
    """Causality: the prediction of layer j's output has no gradient from the inputs of later layers, in training
    and at inference."""
    sae = build(code)
    x = torch.randn(16, L * D_IN, requires_grad=True)
    out = sae.training_loss(x, torch.randn(16, L * D_OUT), state=TrainState())
    for y_hat in (out.x_hat, sae(x)):
        (g,) = torch.autograd.grad(y_hat[:, :D_OUT].sum(), x, retain_graph=True)
        assert g[:, D_IN:].abs().max() == 0 and g[:, :D_IN].abs().max() > 0
        (g,) = torch.autograd.grad(y_hat[:, D_OUT:2 * D_OUT].sum(), x, retain_graph=True)
        assert g[:, 2 * D_IN:].abs().max() == 0 and g[:, D_IN:2 * D_IN].abs().max() > 0


def test_training_forward_and_gradients(code):
    sae = build(code, skip_connection=True)
    x, y = torch.randn(64, L * D_IN), torch.randn(64, L * D_OUT)
    dead = torch.zeros(L * F, dtype=torch.bool)
    dead[::3] = True
    out = sae.training_loss(x, y, state=TrainState(dead_mask=dead, sparsity_scale=0.5))
    assert set(out.terms) == ({"mse", "l0"} if code == "jumprelu" else {"mse", "auxk"})
    assert torch.allclose(out.loss, sum(out.terms.values()))
    assert torch.allclose(out.terms["mse"], (out.x_hat - y).pow(2).sum(1).mean())
    assert out.fired.shape == (L * F,) and out.l0 > 0
    if code != "batchtopk":  # the others train with their inference forward
        assert torch.allclose(out.x_hat, sae(x), atol=1e-5)
        assert out.l0 == pytest.approx(float((sae.encode(x) > 0).sum(1).float().mean()), rel=1e-6)
    out.loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("code", ["topk", "batchtopk"])
def test_the_sparse_kernels_match_the_reference(code):
    fast = build(code)
    ref = copy.deepcopy(fast)
    object.__setattr__(ref.cfg, "kernel", "reference")
    x, y = torch.randn(48, L * D_IN), torch.randn(48, L * D_OUT)
    dead = torch.zeros(L * F, dtype=torch.bool)
    dead[1::4] = True
    outs = [m.training_loss(x, y, state=TrainState(dead_mask=dead)) for m in (fast, ref)]
    for o in outs:
        o.loss.backward()
    assert torch.allclose(outs[0].loss, outs[1].loss, rtol=1e-5)
    for (n, a), (_, b) in zip(fast.named_parameters(), ref.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5), n


def test_each_features_decoder_stays_unit_norm(code):
    sae = build(code)
    opt = torch.optim.SGD(sae.parameters(), lr=0.5)
    sae.training_loss(torch.randn(32, L * D_IN), torch.randn(32, L * D_OUT), state=TrainState()).loss.backward()
    sae.before_optimizer_step()
    for w in sae.W_dec:
        flat, g = w.detach().reshape(F, -1), w.grad.reshape(F, -1)
        assert (g * flat).sum(1).abs().max() < 1e-5  # no component along the feature's own decoder
    opt.step()
    sae.after_optimizer_step()
    for w in sae.W_dec:
        assert torch.allclose(w.detach().reshape(F, -1).norm(dim=1), torch.ones(F), atol=1e-6)


def test_fold_per_layer_scales_keeps_the_function(code):
    sae = build(code, skip_connection=True)
    trained = copy.deepcopy(sae)
    s_in, s_out = [0.5, 2.0, 3.0], [4.0, 0.25, 1.5]
    x = torch.randn(30, L * D_IN)
    sae.fold_input_scale(s_in, s_out)
    scaled = trained(x * torch.tensor(s_in).repeat_interleave(D_IN)) / torch.tensor(s_out).repeat_interleave(D_OUT)
    assert torch.allclose(sae(x), scaled, rtol=1e-5, atol=1e-5)
    # the latents keep their training units
    assert torch.allclose(sae.encode(x), trained.encode(x * torch.tensor(s_in).repeat_interleave(D_IN)), atol=1e-5)
    with pytest.raises(SaeforgeError, match="one per site"):
        sae.fold_input_scale([1.0, 2.0])


def test_save_load_round_trip_is_exact(code, tmp_path):
    sae = build(code, skip_connection=True)
    save_sae(sae, tmp_path / "clt", metadata={"reads": ["a", "b", "c"], "writes": ["d", "e", "f"]})
    loaded = load_sae(tmp_path / "clt")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    for key, value in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(7, L * D_IN)
    assert torch.equal(loaded(x), sae(x))


def test_decoder_cosines_equal_those_of_the_padded_decoder_matrix():
    """Each latent's decoder over all output layers, zeros before its own layer: [d_sae, L * d_out]."""
    sae = build("jumprelu", seed=3)
    with torch.no_grad():
        sae.W_dec[1].mul_(2.5)  # unequal norms: the cosine must divide them out
    dense = torch.zeros(L * F, L * D_OUT)
    for i in range(L):
        dense[i * F:(i + 1) * F, i * D_OUT:] = sae.W_dec[i].detach().reshape(F, -1)
    unit = dense / dense.norm(dim=1, keepdim=True)
    want = unit @ unit.T
    for start, stop in ((0, L * F), (5, 37), (F + 3, F + 4)):
        got = sae.decoder_cosines(start, stop)
        torch.testing.assert_close(got, want[start:stop], rtol=0, atol=1e-6)
    # a layer-0 latent and a layer-2 latent share only output layer 2
    assert want[0, 2 * F] != 0 and want[2 * F, 0] == want[0, 2 * F]


def test_config_rules():
    cfg = TopKCLTConfig.from_training_options(d_in=3 * 8, d_sae=3 * 16, d_out=3 * 6, k=4, sparsity_coefficient=-1,
                                              dead_after_tokens=100, read_widths=(8, 8, 8), write_widths=(6, 6, 6))
    assert cfg.n_layers == 3 and cfg.features_per_layer == 16 and cfg.d_layer_in == 8 and cfg.d_layer_out == 6
    assert cfg.is_transcoder and not cfg.apply_b_dec_to_input
    assert cfg.aux_k == 3  # AuxK per layer: half a layer's output width
    assert cfg.learning_rate() == TopKCLTConfig.default_lr(16)  # the rule at one layer's dictionary
    with pytest.raises(SaeforgeError, match="reads 3 and writes 2"):
        TopKCLTConfig.binding_options((8, 8, 8), (6, 6))
    with pytest.raises(SaeforgeError, match="sites of one width"):
        TopKCLTConfig.binding_options((8, 4), (6, 6))
    with pytest.raises(SaeforgeError, match="not a multiple of n_layers=3"):
        TopKCLTConfig(d_in=24, d_sae=40, d_out=18, n_layers=3, k=2)
    with pytest.raises(SaeforgeError, match="k=20 is more than the 16 features of a layer"):
        TopKCLTConfig(d_in=24, d_sae=48, d_out=18, n_layers=3, k=20)


def test_the_memory_statement_counts_the_parameters():
    for n_layers, skip in ((1, False), (4, True), (7, False)):
        sae = make_sae(TopKCLTConfig(d_in=n_layers * 8, d_sae=n_layers * 16, d_out=n_layers * 6, n_layers=n_layers,
                                     k=2, skip_connection=skip))
        mem = clt_memory(n_layers, 8, 6, 16, skip_connection=skip)
        assert mem["parameters"] == sum(p.numel() for p in sae.parameters())
        assert mem["decoder_parameters"] == sum(w.numel() for w in sae.W_dec) + sae.b_dec.numel()
    big = clt_memory(30, 576, 576, 4608)
    assert big["decoder_parameters"] == 4608 * 576 * 465 + 30 * 576  # L(L+1)/2 = 465 decoder blocks
    assert big["training_state_bytes"] == 16 * big["parameters"]


# ------------------------------------------------------------------------------------------------- ground truth
# Two layers with independent sparse features (32 in R^16 each, 2 active on average); layer 0's features write to
# both outputs, layer 1's to its own: y0 = c0 G00, y1 = c0 G01 + c1 G11. Half of y1's variance comes from layer 0,
# so only the cross-layer decoders can explain it. Checked by hand on seeds 0 and 1 (worst: FVU of y1 0.139,
# cosines 0.909 / 0.918).
N_FEATURES, D_LAYER, D_TARGET, ACTIVE, K = 32, 16, 12, 2, 3


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_clt_learns_what_layer_0_writes_into_layer_1(one_thread):
    seed = 0
    torch.manual_seed(seed)
    layers = [SparseFeatureModel.create(D_LAYER, N_FEATURES, mean_active=ACTIVE, seed=seed + i) for i in range(2)]
    g = torch.Generator().manual_seed(seed + 7)

    def unit(*shape):
        t = torch.randn(*shape, generator=g)
        return t / t.norm(dim=-1, keepdim=True)

    g00, g01, g11 = unit(N_FEATURES, D_TARGET), unit(N_FEATURES, D_TARGET), unit(N_FEATURES, D_TARGET)

    def sample(n):
        (x0, c0), (x1, c1) = (m.sample(n, generator=g) for m in layers)
        return torch.cat([x0, x1], 1), torch.cat([c0 @ g00, c0 @ g01 + c1 @ g11], 1)

    cfg = TopKCLTConfig(d_in=2 * D_LAYER, d_sae=2 * N_FEATURES, d_out=2 * D_TARGET, n_layers=2, k=K,
                        dead_after_tokens=20_000)
    x0, y0 = sample(4096)
    scaler = ActivationScaler.fit(x0, "expected_norm", y0)
    sae = make_sae(cfg)
    sae.init_from_data(scaler.scale_input(x0), scaler.scale_target(y0))
    steps = 700
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (steps - s) / (0.3 * steps)))
    tracker = DeadLatentTracker(cfg.d_sae, 20_000)
    for step in range(steps):
        x, y = sample(512)
        out = sae.training_loss(scaler.scale_input(x), scaler.scale_target(y),
                                state=TrainState(step=step, dead_mask=tracker.dead_mask))
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
        opt.zero_grad()
        sched.step()
        tracker.update(out.fired, 512)
    scaler.fold_into(sae)
    x, y = sample(16384)
    with torch.no_grad():
        y_hat = sae(x)
    y1, y1_hat = y[:, D_TARGET:], y_hat[:, D_TARGET:]
    fvu_1 = float((y1_hat - y1).pow(2).sum() / (y1 - y1.mean(0)).pow(2).sum())
    assert fvu_1 < 0.22, fvu_1
    # layer 0's features found their directions in both outputs: the cross-layer decoder block is G01
    assert mean_max_cosine(sae.W_dec[0][:, 0].detach(), g00) > 0.85
    assert mean_max_cosine(sae.W_dec[0][:, 1].detach(), g01) > 0.85
    # and without that block (what reading layer 1 alone can do) about half of y1 is lost
    with torch.no_grad():
        sae.W_dec[0][:, 1].zero_()
        y1_alone = sae(x)[:, D_TARGET:]
    assert float((y1_alone - y1).pow(2).sum() / (y1 - y1.mean(0)).pow(2).sum()) > 0.4
