"""circuit-tracer transcoder and CLT files: round trips, and hand-built files against circuit-tracer's documented
computation (F.linear encoder, JumpReLU or ReLU, skip term), never importing the tool."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from saeforge.errors import SaeforgeError
from saeforge.formats import detect_format, read_any, save_as
from saeforge.saes import (
    BatchTopKTranscoderConfig,
    JumpReLUCLTConfig,
    JumpReLUSkipTranscoderConfig,
    TopKCLTConfig,
    TopKTranscoderConfig,
    make_sae,
)

D, F_, L = 12, 24, 3


def jump_transcoder(seed=0, skip=True):
    torch.manual_seed(seed)
    sae = make_sae(JumpReLUSkipTranscoderConfig(d_in=D, d_sae=F_, d_out=D))
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(F_))
        sae.b_dec.copy_(0.3 * torch.randn(D))
        sae.log_threshold.copy_(torch.log(0.1 + 0.3 * torch.rand(F_)))
        sae.W_skip.copy_(0.2 * torch.randn(D, D))
    return sae


def jump_clt(seed=0, skip=True):
    torch.manual_seed(seed)
    sae = make_sae(JumpReLUCLTConfig(d_in=L * D, d_sae=L * F_, d_out=L * D, n_layers=L, skip_connection=skip))
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(L, F_))
        sae.b_dec.copy_(0.3 * torch.randn(L, D))
        sae.log_threshold.copy_(torch.log(0.1 + 0.3 * torch.rand(L, F_)))
        if skip:
            sae.W_skip.copy_(0.2 * torch.randn(L, D, D))
    return sae


def x_in(n=64, d=D, seed=3):
    return 2.0 * torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_transcoder_round_trip_builds_a_set(tmp_path):
    a, b = jump_transcoder(0), jump_transcoder(1)
    save_as(a, tmp_path, "circuit_tracer", metadata={"reads": ["layers.3.mlp_in"], "writes": ["layers.3.mlp_out"],
                                                      "model_name": "embedded"})
    assert detect_format(tmp_path) == ("circuit_tracer", tmp_path)
    save_as(b, tmp_path, "circuit_tracer", metadata={"hook_name": "layers.7.mlp_in", "hook_name_out": "layers.7.mlp_out"})
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set" and config["transcoders"] == ["layer_3.safetensors",
                                                                                  "layer_7.safetensors"]
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("mlp.hook_in", "hook_mlp_out")
    with pytest.raises(SaeforgeError, match="transcoder set of 2 layers"):
        detect_format(tmp_path)
    for sae, layer in ((a, 3), (b, 7)):
        imp = read_any(tmp_path / f"layer_{layer}.safetensors")
        assert imp.sae.architecture == "jumprelu_skip_transcoder" and imp.fmt == "circuit_tracer"
        assert imp.metadata["reads"] == [f"layers.{layer}.mlp_in"] and imp.metadata["writes"] == [
            f"layers.{layer}.mlp_out"]
        x = x_in()
        assert torch.equal(imp.sae.encode(x), sae.encode(x)) and torch.equal(imp.sae(x), sae(x))
    with pytest.raises(SaeforgeError, match="a set shares its hooks"):
        save_as(a, tmp_path, "circuit_tracer", metadata={"reads": ["layers.1.resid_pre"],
                                                          "writes": ["layers.1.resid_post"]})


@pytest.mark.parametrize("jump", [True, False])
def test_a_hand_built_transcoder_file_encodes_as_circuit_tracer_does(tmp_path, jump):
    g = torch.Generator().manual_seed(0)
    t = {"W_enc": torch.randn(F_, D, generator=g) / D**0.5, "W_dec": torch.randn(F_, 8, generator=g),
         "b_enc": 0.2 * torch.randn(F_, generator=g), "b_dec": 0.3 * torch.randn(8, generator=g),
         "W_skip": 0.2 * torch.randn(8, D, generator=g)}
    if jump:
        t["activation_function.threshold"] = 0.05 + 0.4 * torch.rand(F_, generator=g)
    save_file(t, str(tmp_path / "layer_2.safetensors"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model_name": "google/gemma-2-2b",
                                                          "model_kind": "transcoder_set",
                                                          "feature_input_hook": "hook_resid_mid",
                                                          "feature_output_hook": "hook_mlp_out"}))
    imp = read_any(tmp_path)
    x = x_in()
    pre = F.linear(x, t["W_enc"], t["b_enc"])
    f = pre * (pre > t["activation_function.threshold"]) if jump else torch.relu(pre)
    torch.testing.assert_close(imp.sae.encode(x), f, rtol=1e-6, atol=1e-6)  # x @ W.T vs F.linear: other kernel
    assert torch.equal(imp.sae.encode(x) > 0, f > 0)
    torch.testing.assert_close(imp.sae(x), f @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T, rtol=1e-5, atol=1e-5)
    assert imp.metadata["writes"] == ["layers.2.mlp_out"] and imp.metadata["model_name"] == "google/gemma-2-2b"
    assert imp.metadata["reads"] == ["blocks.2.hook_resid_mid"]  # no saeforge site: kept, with a note
    assert any("hook_resid_mid" in n for n in imp.notes)
    assert any("ReLU" in n for n in imp.notes) is not jump


def test_clt_round_trip(tmp_path):
    sae = jump_clt()
    meta = {"reads": [f"layers.{i}.mlp_in" for i in range(L)], "writes": [f"layers.{i}.mlp_out" for i in range(L)]}
    save_as(sae, tmp_path, "circuit_tracer_clt", metadata=meta)
    assert sorted(p.name for p in tmp_path.glob("W_*")) == sorted(
        [f"W_enc_{i}.safetensors" for i in range(L)] + [f"W_dec_{i}.safetensors" for i in range(L)])
    assert detect_format(tmp_path) == ("circuit_tracer_clt", tmp_path)
    imp = read_any(tmp_path)
    assert imp.sae.architecture == "jumprelu_clt" and imp.metadata["reads"] == meta["reads"]
    x = x_in(d=L * D)
    assert torch.equal(imp.sae.encode(x), sae.encode(x)) and torch.equal(imp.sae(x), sae(x))


def test_a_hand_built_clt_computes_as_circuit_tracer_does(tmp_path):
    """circuit-tracer: features_i = act(x_i W_enc_iᵀ + b_enc_i), recon_j = Σ_{i<=j} f_i W_dec_i[:, j - i] + b_dec_j
    + x_j W_skip_j."""
    g = torch.Generator().manual_seed(1)
    enc = [{"W_enc": torch.randn(F_, D, generator=g) / D**0.5, "b_enc": 0.2 * torch.randn(F_, generator=g),
            "b_dec": 0.3 * torch.randn(D, generator=g), "threshold": 0.05 + 0.3 * torch.rand(F_, generator=g),
            "W_skip": 0.1 * torch.randn(D, D, generator=g)} for _ in range(L)]
    dec = [torch.randn(F_, L - i, D, generator=g) for i in range(L)]
    for i in range(L):
        save_file({f"{k}_{i}": v for k, v in enc[i].items()}, str(tmp_path / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": dec[i]}, str(tmp_path / f"W_dec_{i}.safetensors"))
    imp = read_any(tmp_path)
    x = x_in(d=L * D)
    xs = x.reshape(-1, L, D)
    feats = []
    for i in range(L):
        pre = F.linear(xs[:, i], enc[i]["W_enc"], enc[i]["b_enc"])
        feats.append(pre * (pre > enc[i]["threshold"]))
    torch.testing.assert_close(imp.sae.encode(x), torch.cat(feats, 1), rtol=1e-6, atol=1e-6)
    recon = [sum(feats[i] @ dec[i][:, j - i] for i in range(j + 1)) + enc[j]["b_dec"] + xs[:, j] @ enc[j]["W_skip"]
             for j in range(L)]
    torch.testing.assert_close(imp.sae(x), torch.cat(recon, 1), rtol=1e-5, atol=1e-5)
    assert imp.metadata["reads"] == [f"layers.{i}.mlp_in" for i in range(L)]


def test_what_circuit_tracer_cannot_hold_is_refused(tmp_path):
    topk = make_sae(TopKTranscoderConfig(d_in=D, d_sae=F_, k=3))
    with pytest.raises(SaeforgeError, match="TopK selection is not a threshold"):
        save_as(topk, tmp_path / "a", "circuit_tracer", metadata={"hook_name": "layers.1.mlp_in"})
    unlearnt = make_sae(BatchTopKTranscoderConfig(d_in=D, d_sae=F_, k=3))
    with pytest.raises(SaeforgeError, match="not learned its inference threshold"):
        save_as(unlearnt, tmp_path / "b", "circuit_tracer", metadata={"hook_name": "layers.1.mlp_in"})
    with pytest.raises(SaeforgeError, match="does not say which site"):
        save_as(jump_transcoder(), tmp_path / "c", "circuit_tracer")
    clt = make_sae(TopKCLTConfig(d_in=2 * D, d_sae=2 * F_, d_out=2 * D, n_layers=2, k=3))
    with pytest.raises(SaeforgeError, match="TopK selection"):
        save_as(clt, tmp_path / "d", "circuit_tracer_clt")


def test_one_format_passed_as_another_is_named(tmp_path):
    save_as(jump_clt(), tmp_path / "clt", "circuit_tracer_clt")
    with pytest.raises(SaeforgeError, match="holds a circuit_tracer_clt SAE, not gemmascope2_clt") as err:
        read_any(tmp_path / "clt", fmt="gemmascope2_clt")
    assert "circuit_tracer_clt" in err.value.fix
    save_as(jump_transcoder(), tmp_path / "gs", "gemmascope2", metadata={"hook_name": "layers.1.mlp_in",
                                                                         "hook_name_out": "layers.1.mlp_out"})
    with pytest.raises(SaeforgeError, match="holds a gemmascope2 SAE, not sparsify"):
        read_any(tmp_path / "gs", fmt="sparsify")
