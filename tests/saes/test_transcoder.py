"""Transcoders and skip transcoders: structure, folding, saving, and ground truth (a sparse code of one space that
predicts another must find the true output directions)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.evals.synthetic import SparseFeatureModel, mean_max_cosine
from saeforge.saes import (
    ActivationScaler,
    BatchTopKSkipTranscoderConfig,
    BatchTopKTranscoderConfig,
    DeadLatentTracker,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoderConfig,
    SAEConfig,
    TopKSkipTranscoderConfig,
    TopKTranscoderConfig,
    TrainState,
    get_config_class,
    load_sae,
    make_sae,
    save_sae,
)

from .helpers import randomise

CONFIGS = {
    "topk_transcoder": lambda **kw: TopKTranscoderConfig(**{"k": 4, **kw}),
    "batchtopk_transcoder": lambda **kw: BatchTopKTranscoderConfig(**{"k": 4, **kw}),
    "jumprelu_transcoder": lambda **kw: JumpReLUTranscoderConfig(**{"bandwidth": 0.5, "threshold_init": 0.3, **kw}),
    "topk_skip_transcoder": lambda **kw: TopKSkipTranscoderConfig(**{"k": 4, **kw}),
    "batchtopk_skip_transcoder": lambda **kw: BatchTopKSkipTranscoderConfig(**{"k": 4, **kw}),
    "jumprelu_skip_transcoder": lambda **kw: JumpReLUSkipTranscoderConfig(**{"bandwidth": 0.5, "threshold_init": 0.3,
                                                                             **kw}),
}


def build(name: str, d_in: int = 12, d_out: int | None = 7, seed: int = 0):
    torch.manual_seed(seed)
    sae = make_sae(CONFIGS[name](d_in=d_in, d_sae=32, d_out=d_out))
    randomise(sae, seed)
    if name.startswith("batchtopk"):
        sae.threshold.fill_(0.4)
    if sae.cfg.skip_connection:
        with torch.no_grad():
            sae.W_skip.copy_(0.2 * torch.randn(sae.W_skip.shape))
    return sae


@pytest.fixture(params=list(CONFIGS))
def name(request) -> str:
    return request.param


def test_a_residual_to_residual_transcoder_is_a_transcoder(name):
    """Equal widths do not make it an SAE: b_dec is an output bias, the init is untied, b_dec comes from the target."""
    sae = make_sae(CONFIGS[name](d_in=12, d_sae=32))
    assert sae.cfg.is_transcoder and sae.cfg.d_out == 12 and sae.cfg.apply_b_dec_to_input is False
    assert not torch.equal(sae.W_enc, sae.W_dec.T)
    x, y = torch.randn(300, 12), torch.randn(300, 12) + 5.0
    sae.init_from_data(x, y)
    assert torch.allclose(sae.b_dec, torch.full((12,), 5.0), atol=0.4)
    with pytest.raises(SaeforgeError, match="needs a target"):
        sae.training_loss(x, state=TrainState())
    with pytest.raises(SaeforgeError, match="apply_b_dec_to_input must be false"):
        CONFIGS[name](d_in=12, d_sae=32, apply_b_dec_to_input=True)


def test_forward_adds_the_skip_term_and_training_fits_it(name):
    sae = build(name)
    x, y = torch.randn(64, 12), torch.randn(64, 7)
    expected = sae.decode(sae.encode(x)) + (x @ sae.W_skip.T if sae.cfg.skip_connection else 0)
    assert torch.allclose(sae(x), expected)
    out = sae.training_loss(x, y, state=TrainState(dead_mask=torch.ones(32, dtype=torch.bool)))
    assert torch.allclose(out.terms["mse"], (out.x_hat - y).pow(2).sum(1).mean())
    if not name.startswith("batchtopk"):  # BatchTopK selects over the batch while training
        assert torch.allclose(out.x_hat, sae(x), atol=1e-5)
    out.loss.backward()
    names = {n for n, p in sae.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    assert {"W_enc", "W_dec", "b_dec"} <= names
    assert ("W_skip" in names) == sae.cfg.skip_connection


@pytest.mark.parametrize("scales", [(4.0, 0.5), (0.3, 0.3)])
def test_fold_input_scale_keeps_the_function(name, scales):
    sae = build(name)
    trained = copy.deepcopy(sae)
    s_in, s_out = scales
    x = 2.0 * torch.randn(40, 12)
    sae.fold_input_scale(s_in, s_out)
    assert torch.allclose(sae(x), trained(x * s_in) / s_out, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_is_exact(name, tmp_path):
    sae = build(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_sae(sae, tmp_path / "tc", metadata={"hook_name": "layers.1.mlp_in", "hook_name_out": "layers.1.mlp_out"})
    loaded = load_sae(tmp_path / "tc")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    for key, value in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(9, 12)
    assert torch.equal(loaded(x), sae(x))
    skip_lost = name == "topk_skip_transcoder"  # SAELens has no TopK (skip) transcoder: said when saving
    assert any("without W_skip" in str(w.message) for w in caught) == skip_lost
    from safetensors.torch import load_file

    in_saelens_file = "W_skip" in load_file(str(tmp_path / "tc" / "sae_weights.safetensors"))
    assert in_saelens_file == (sae.cfg.skip_connection and not skip_lost)


def test_the_trainer_trains_a_plain_architecture_with_a_target_as_its_transcoder():
    assert get_config_class("topk").for_binding("transcoder") is TopKTranscoderConfig
    assert get_config_class("jumprelu").for_binding("transcoder") is JumpReLUTranscoderConfig
    assert get_config_class("topk").for_binding("sae").architecture == "topk"
    assert get_config_class("relu").for_binding("transcoder").architecture == "relu"  # no transcoder form: as before
    with pytest.raises(SaeforgeError, match="trains transcoder dictionaries, but this one is a sae") as err:
        TopKTranscoderConfig.for_binding("sae")
    assert "topk" in err.value.fix
    with pytest.raises(SaeforgeError, match="reads one site and writes one"):
        TopKTranscoderConfig.from_training_options(d_in=24, d_sae=32, k=4, sparsity_coefficient=-1,
                                                   dead_after_tokens=100, read_widths=(12, 12), write_widths=(7,))
    cfg = SAEConfig.from_dict({"architecture": "topk_skip_transcoder", "d_in": 8, "d_sae": 16, "k": 2})
    assert cfg.skip_connection and cfg.d_out == 8


# ------------------------------------------------------------------------------------------------- ground truth
# x = Σ c_i d_i (64 sparse features in R^32, 3 active on average), y = Σ c_i g_i with other, random output directions
# in R^24: the features are only reachable through a sparse code of x. Bounds checked by hand on seeds 0 and 1
# (worst case: topk cosine 0.902, FVU 0.118; batchtopk 0.901 / 0.090; jumprelu 0.835 / 0.126; skip 0.032 against
# 0.105 without); each run is a few seconds on a quiet machine.
D_IN, N_FEATURES, TRUE_L0, D_OUT = 32, 64, 3, 24


def train_on_ground_truth(cfg, *, seed=0, steps=700, lr=1e-2, sparsity_warmup=0.0, linear_part=False):
    torch.manual_seed(seed)
    model = SparseFeatureModel.create(D_IN, N_FEATURES, mean_active=TRUE_L0, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    out_dirs = torch.randn(N_FEATURES, D_OUT, generator=g)
    out_dirs /= out_dirs.norm(dim=1, keepdim=True)
    dense = torch.randn(D_IN, D_OUT, generator=g) / D_IN ** 0.5

    def sample(n):
        x, codes = model.sample(n, generator=g)
        y = codes @ out_dirs
        return x, (y + x @ dense if linear_part else y)

    x0, y0 = sample(4096)
    scaler = ActivationScaler.fit(x0, "expected_norm", y0)
    sae = make_sae(cfg)
    sae.init_from_data(scaler.scale_input(x0), scaler.scale_target(y0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (steps - s) / (0.3 * steps)))
    tracker = DeadLatentTracker(N_FEATURES, 20_000)
    for step in range(steps):
        x, y = sample(512)
        warm = 1.0 if not sparsity_warmup else min(1.0, step / (sparsity_warmup * steps))
        out = sae.training_loss(scaler.scale_input(x), scaler.scale_target(y),
                                state=TrainState(step=step, sparsity_scale=warm, dead_mask=tracker.dead_mask))
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
    fvu = float((y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    x_fit, y_fit = sample(8192)
    ones = lambda t: torch.cat([t, torch.ones(len(t), 1)], 1)  # noqa: E731
    w = torch.linalg.lstsq(ones(x_fit), y_fit).solution
    linear_fvu = float((ones(x) @ w - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    return sae, fvu, float(mean_max_cosine(sae.W_dec.detach(), out_dirs)), linear_fvu


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: see tests/saes/test_ground_truth.py
    yield
    torch.set_num_threads(before)


def test_topk_transcoder_finds_the_output_directions():
    sae, fvu, cosine, linear_fvu = train_on_ground_truth(
        TopKTranscoderConfig(d_in=D_IN, d_sae=N_FEATURES, d_out=D_OUT, k=TRUE_L0, dead_after_tokens=20_000))
    assert cosine >= 0.85 and fvu < 0.16, (cosine, fvu)
    assert fvu < 0.7 * linear_fvu, (fvu, linear_fvu)  # the sparse code does what no linear map can


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu"])
def test_other_codes_find_the_output_directions(arch):
    if arch == "batchtopk":
        cfg = BatchTopKTranscoderConfig(d_in=D_IN, d_sae=N_FEATURES, d_out=D_OUT, k=TRUE_L0, dead_after_tokens=20_000,
                                        threshold_start_step=350)
        sae, fvu, cosine, _ = train_on_ground_truth(cfg)
        assert cosine >= 0.85 and fvu < 0.14, (cosine, fvu)
        assert sae.threshold_learned
    else:
        cfg = JumpReLUTranscoderConfig(d_in=D_IN, d_sae=N_FEATURES, d_out=D_OUT, l0_coefficient=0.7, bandwidth=0.2,
                                       threshold_init=1.0)
        sae, fvu, cosine, _ = train_on_ground_truth(cfg, steps=900, lr=5e-3, sparsity_warmup=0.3)
        assert cosine >= 0.78 and fvu < 0.17, (cosine, fvu)


@pytest.mark.slow
def test_a_skip_transcoder_takes_the_dense_linear_part():
    """y = sparse part + a dense linear map of x: the skip connection carries the linear part, which a plain
    transcoder has to approximate through its k latents."""
    kw = dict(d_in=D_IN, d_sae=N_FEATURES, d_out=D_OUT, k=TRUE_L0, dead_after_tokens=20_000)
    _, plain, _, _ = train_on_ground_truth(TopKTranscoderConfig(**kw), linear_part=True)
    skip_sae, skip, _, _ = train_on_ground_truth(TopKSkipTranscoderConfig(**kw), linear_part=True)
    assert skip < 0.5 * plain, (skip, plain)
    assert float(skip_sae.W_skip.detach().abs().max()) > 0.1
