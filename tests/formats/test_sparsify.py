"""sparsify hookpoint folders (cfg.json + sae.safetensors): round trips and hand-built folders against sparsify's
documented encode (ReLU(encoder(x - b_dec)) then per-row TopK)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from saeforge.errors import SaeforgeError
from saeforge.formats import detect_format, load_any, read_any, save_as
from saeforge.saes import TopKConfig, make_sae

from .helpers import D_IN, D_SAE, assert_same_encodings, build, inputs, topk_dense


def write_folder(folder, cfg: dict, tensors: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))


def sparsify_cfg(**kw) -> dict:
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE, "k": 5,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN}
    cfg.update(kw)
    return cfg


def sparsify_tensors(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"encoder.weight": torch.randn(D_SAE, D_IN, generator=g) / D_IN**0.5,
            "encoder.bias": 0.2 * torch.randn(D_SAE, generator=g),
            "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": 0.3 * torch.randn(D_IN, generator=g)}


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_round_trip(tmp_path, apply_b_dec):
    sae = build("topk", apply_b_dec_to_input=apply_b_dec)
    save_as(sae, tmp_path, "sparsify")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["transcode"] is (not apply_b_dec) and cfg["num_latents"] == D_SAE and cfg["k"] == 4
    assert cfg["d_in"] == D_IN and cfg["activation"] == "topk"
    w = load_file(str(tmp_path / "sae.safetensors"))
    assert set(w) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    assert w["encoder.weight"].shape == (D_SAE, D_IN) and w["W_dec"].shape == (D_SAE, D_IN)
    assert detect_format(tmp_path) == ("sparsify", tmp_path)
    back = load_any(tmp_path)
    # sparsify's only "do not subtract b_dec" switch is transcode: such a coder reads back as a TopK transcoder
    assert back.architecture == ("topk" if apply_b_dec else "topk_transcoder")
    assert back.cfg.apply_b_dec_to_input is apply_b_dec
    assert_same_encodings(sae, back)


@pytest.mark.parametrize("transcode", [False, True])
def test_foreign_folder_matches_sparsify_encode(tmp_path, transcode):
    t = sparsify_tensors()
    write_folder(tmp_path / "layers.5", sparsify_cfg(transcode=transcode), t)
    (tmp_path / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M", "ctx_len": 128}))
    imp = read_any(tmp_path / "layers.5")
    x = inputs()
    x_in = x if transcode else x - t["b_dec"]
    ref = topk_dense(F.linear(x_in, t["encoder.weight"], t["encoder.bias"]), 5)
    got = imp.sae.encode(x)
    assert torch.equal(got > 0, ref > 0)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)  # x @ W.T vs F.linear: same math, other kernel
    # reconstruction: sparsify decodes with W_dec [num_latents, d_in] + b_dec
    torch.testing.assert_close(imp.sae.decode(got), ref @ t["W_dec"] + t["b_dec"], rtol=1e-5, atol=1e-5)
    run_meta = {"model_name": "HuggingFaceTB/SmolLM2-135M", "context_size": 128}
    if transcode:  # a transcoder at the block reads its input and writes its output
        assert imp.sae.architecture == "topk_transcoder"
        assert imp.metadata == {"hook_name": "layers.5.resid_pre", "hook_name_out": "layers.5.resid_post",
                                "reads": ["layers.5.resid_pre"], "writes": ["layers.5.resid_post"], **run_meta}
    else:
        assert imp.metadata == {"hook_name": "layers.5", **run_meta}


def test_num_latents_zero_uses_expansion_factor(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {"encoder.weight": torch.randn(2 * D_IN, D_IN, generator=g), "encoder.bias": torch.zeros(2 * D_IN),
         "W_dec": torch.randn(2 * D_IN, D_IN, generator=g), "b_dec": torch.zeros(D_IN)}
    write_folder(tmp_path, sparsify_cfg(num_latents=0, expansion_factor=2), t)
    assert load_any(tmp_path).cfg.d_sae == 2 * D_IN
    write_folder(tmp_path, sparsify_cfg(num_latents=0, expansion_factor=3), t)
    with pytest.raises(SaeforgeError, match="latents"):
        load_any(tmp_path)


@pytest.mark.parametrize("change, match", [
    ({"activation": "groupmax"}, "groupmax"),
    ({"skip_connection": True}, "skip connection"),
    ({"d_in": D_IN + 1}, "d_in"),
    ({"k": 0}, "'k'"),
])
def test_config_refusals(tmp_path, change, match):
    write_folder(tmp_path, sparsify_cfg(**change), sparsify_tensors())
    with pytest.raises(SaeforgeError, match=match):
        load_any(tmp_path)


def test_unknown_missing_and_misshapen_tensors(tmp_path):
    t = sparsify_tensors()
    t["W_skip"] = torch.zeros(D_IN, D_IN)
    write_folder(tmp_path / "a", sparsify_cfg(), t)
    with pytest.raises(SaeforgeError, match="W_skip"):
        load_any(tmp_path / "a")
    t = sparsify_tensors()
    del t["encoder.bias"]
    write_folder(tmp_path / "b", sparsify_cfg(), t)
    with pytest.raises(SaeforgeError, match="encoder.bias"):
        load_any(tmp_path / "b")
    t = sparsify_tensors()
    t["W_dec"] = t["W_dec"].T  # [d_in, num_latents]: not sparsify's layout
    write_folder(tmp_path / "c", sparsify_cfg(), t)
    with pytest.raises(SaeforgeError, match="W_dec has shape"):
        load_any(tmp_path / "c")


def test_missing_and_damaged_files(tmp_path):
    write_folder(tmp_path, sparsify_cfg(), sparsify_tensors())
    (tmp_path / "cfg.json").unlink()
    with pytest.raises(SaeforgeError, match="cfg.json is missing"):
        load_any(tmp_path, fmt="sparsify")
    (tmp_path / "cfg.json").write_text(json.dumps(sparsify_cfg()))
    (tmp_path / "sae.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(SaeforgeError, match="not a readable safetensors"):
        load_any(tmp_path)


def test_write_refusals(tmp_path):
    with pytest.raises(SaeforgeError, match="no jumprelu sparse coder"):
        save_as(build("jumprelu"), tmp_path / "j", "sparsify")
    with pytest.raises(SaeforgeError, match="no batchtopk sparse coder"):
        save_as(build("batchtopk"), tmp_path / "b", "sparsify")
    with pytest.raises(SaeforgeError, match="d_out"):
        save_as(make_sae(TopKConfig(d_in=D_IN, d_sae=D_SAE, d_out=5, k=2)), tmp_path / "t", "sparsify")


def test_skip_transcoder_round_trip_and_documented_forward(tmp_path):
    from saeforge.saes import TopKSkipTranscoderConfig

    torch.manual_seed(0)
    sae = make_sae(TopKSkipTranscoderConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    with torch.no_grad():
        sae.W_skip.copy_(0.2 * torch.randn(D_IN, D_IN))
        sae.b_enc.copy_(0.2 * torch.randn(D_SAE))
    folder = tmp_path / "layers.4.mlp"
    save_as(sae, folder, "sparsify")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["transcode"] is True and cfg["skip_connection"] is True
    w = load_file(str(folder / "sae.safetensors"))
    x = inputs()
    # sparsify: TopK(ReLU(encoder(x))) (no b_dec subtraction for a transcoder), decode + x @ W_skip.mT
    f = topk_dense(F.linear(x, w["encoder.weight"], w["encoder.bias"]), 4)
    torch.testing.assert_close(f @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].mT, sae(x), rtol=1e-5, atol=1e-5)
    imp = read_any(folder)
    assert imp.sae.architecture == "topk_skip_transcoder"
    assert imp.metadata["reads"] == ["layers.4.mlp_in"] and imp.metadata["writes"] == ["layers.4.mlp_out"]
    assert torch.equal(imp.sae(x), sae(x))


def test_a_skip_connection_on_a_plain_sae_is_refused(tmp_path):
    t = sparsify_tensors()
    t["W_skip"] = torch.zeros(D_IN, D_IN)
    write_folder(tmp_path, sparsify_cfg(skip_connection=True), t)
    with pytest.raises(SaeforgeError, match="SAE with a skip connection"):
        load_any(tmp_path)
