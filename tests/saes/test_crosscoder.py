"""Crosscoders: one dictionary over several sites, folded per site, with decoder norms per site."""

from __future__ import annotations

import copy

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.saes import (
    BatchTopKCrosscoderConfig,
    JumpReLUCrosscoderConfig,
    TopKCrosscoderConfig,
    TrainState,
    load_sae,
    make_sae,
    save_sae,
)

N, D, D_SAE = 3, 8, 32


def build(code: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cls = {"topk": TopKCrosscoderConfig, "batchtopk": BatchTopKCrosscoderConfig,
           "jumprelu": JumpReLUCrosscoderConfig}[code]
    extra = {"k": 4} if code != "jumprelu" else {"bandwidth": 0.5, "threshold_init": 0.3}
    sae = make_sae(cls(d_in=N * D, d_sae=D_SAE, n_sites=N, **{**extra, **kw}))
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(D_SAE))
        sae.b_dec.copy_(0.3 * torch.randn(N * D))
        if code == "batchtopk":
            sae.threshold.fill_(0.4)
    return sae


@pytest.fixture(params=["topk", "batchtopk", "jumprelu"])
def code(request) -> str:
    return request.param


def test_it_is_its_code_on_the_concatenated_sites(code):
    sae = build(code)
    assert sae.cfg.n_sites == N and sae.cfg.d_site_in == D and not sae.cfg.is_transcoder
    x = torch.randn(40, N * D)
    out = sae.training_loss(x, state=TrainState())
    assert out.x_hat.shape == (40, N * D)
    assert torch.allclose(out.terms["mse"], (out.x_hat - x).pow(2).sum(1).mean())
    # every latent's decoder over all sites is one unit vector; its split between the sites is free
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-6)
    norms = sae.decoder_norms()
    assert norms.shape == (D_SAE, N) and torch.allclose(norms.pow(2).sum(1), torch.ones(D_SAE), atol=1e-5)


def test_fold_one_scale_per_site(code):
    # b_dec on both sides (the default for topk) needs equal in/out scales per site; jumprelu does not subtract it
    sae = build(code)
    trained = copy.deepcopy(sae)
    scales = [0.5, 2.0, 7.0]
    x = torch.randn(30, N * D)
    sae.fold_input_scale(scales, scales)
    per_dim = torch.tensor(scales).repeat_interleave(D)
    assert torch.allclose(sae(x), trained(x * per_dim) / per_dim, rtol=1e-5, atol=1e-5)
    assert torch.allclose(sae.encode(x), trained.encode(x * per_dim), atol=1e-5)  # latents keep training units
    # decoder norms in the normalised space are those of the trained crosscoder
    assert torch.allclose(sae.decoder_norms(scales), trained.decoder_norms(), atol=1e-5)
    if sae.cfg.apply_b_dec_to_input:
        with pytest.raises(SaeforgeError, match="must agree"):
            copy.deepcopy(trained).fold_input_scale(scales, [1.0, 1.0, 1.0])


def test_save_load_round_trip_is_exact(code, tmp_path):
    sae = build(code)
    save_sae(sae, tmp_path / "cc", metadata={"reads": ["a--x", "b--x"], "writes": ["a--x", "b--x"]})
    loaded = load_sae(tmp_path / "cc")
    assert loaded.cfg == sae.cfg
    for key, value in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_binding_rules():
    assert TopKCrosscoderConfig.binding_options((8, 8), (8, 8)) == {"n_sites": 2}
    with pytest.raises(SaeforgeError, match="sites of one width"):
        TopKCrosscoderConfig.binding_options((8, 16), (8, 16))
    with pytest.raises(SaeforgeError, match="not a multiple of n_sites=3"):
        TopKCrosscoderConfig(d_in=16, d_sae=32, n_sites=3, k=2)
    assert TopKCrosscoderConfig.for_binding("crosscoder") is TopKCrosscoderConfig
    with pytest.raises(SaeforgeError, match="this one is a transcoder"):
        TopKCrosscoderConfig.for_binding("transcoder")
