"""SAELens v6 folders: round trips for every architecture, hand-built foreign folders against SAELens' documented
encode formulas, and the refusals (normalisation, versions, unknown/missing keys, damaged files)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from saeforge.errors import SaeforgeError
from saeforge.formats import detect_format, load_any, read_any, save_as
from saeforge.saes import ReLUConfig, TopKConfig, make_sae

from .helpers import D_IN, D_SAE, VARIANTS, assert_same_encodings, build, inputs, topk_dense

SAELENS_ARCH = {"relu_april": "standard", "relu_classic": "standard", "topk": "topk", "batchtopk": "jumprelu",
                "matryoshka": "jumprelu", "gated": "gated", "jumprelu": "jumprelu"}


def write_folder(folder, cfg: dict, tensors: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))


def base_cfg(arch: str, **kw) -> dict:
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.3.hook_resid_post"}}
    cfg.update(kw)
    return cfg


def rand_tensors(seed: int = 0, **extra) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5, "b_enc": 0.2 * torch.randn(D_SAE, generator=g),
         "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": 0.3 * torch.randn(D_IN, generator=g)}
    t.update(extra)
    return t


# ---------------------------------------------------------------- round trips through saeforge's writers


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_plain_saelens(tmp_path, variant):
    sae = build(variant)
    save_as(sae, tmp_path, "saelens", metadata={"hook_name": "layers.3.resid_post"})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert "saeforge" not in cfg and not (tmp_path / "saeforge_state.safetensors").exists()
    assert cfg["architecture"] == SAELENS_ARCH[variant]
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    assert detect_format(tmp_path) == ("saelens", tmp_path)
    back = read_any(tmp_path)
    assert back.fmt == "saelens" and back.metadata["hook_name"] == "layers.3.resid_post"
    assert back.sae.cfg.apply_b_dec_to_input == sae.cfg.apply_b_dec_to_input
    assert_same_encodings(sae, back.sae)


@pytest.mark.parametrize("variant", VARIANTS)
def test_saeforge_folder_is_a_saelens_folder(tmp_path, variant):
    """The native folder read by the plain SAELens reader (ignoring the saeforge section) encodes identically."""
    sae = build(variant)
    save_as(sae, tmp_path, "saeforge")
    assert detect_format(tmp_path)[0] == "saeforge"
    assert_same_encodings(sae, load_any(tmp_path, fmt="saelens"))


def test_relu_transcoder_round_trip(tmp_path):
    torch.manual_seed(0)
    sae = make_sae(ReLUConfig(d_in=D_IN, d_sae=D_SAE, d_out=7))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    save_as(sae, tmp_path, "saelens", metadata={"hook_name_out": "blocks.3.hook_mlp_out"})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "transcoder" and cfg["d_out"] == 7 and cfg["hook_name_out"]
    back = load_any(tmp_path)
    assert back.cfg.d_out == 7
    assert_same_encodings(sae, back)


def test_feature_stats_carried(tmp_path):
    sae = build("topk")
    stats = {"sparsity": torch.linspace(-5, -1, D_SAE)}
    save_as(sae, tmp_path / "a", "saelens", feature_stats=stats)
    back = read_any(tmp_path / "a")
    assert torch.equal(back.feature_stats["sparsity"], stats["sparsity"])


def test_unlearned_batchtopk_and_topk_transcoder_refused(tmp_path):
    sae = build("batchtopk")
    sae.threshold.fill_(-1.0)
    with pytest.raises(SaeforgeError, match="inference threshold"):
        save_as(sae, tmp_path / "b", "saelens")
    tc = make_sae(TopKConfig(d_in=D_IN, d_sae=D_SAE, d_out=5, k=3))
    with pytest.raises(SaeforgeError, match="no topk transcoder"):
        save_as(tc, tmp_path / "t", "saelens")


# ---------------------------------------------------------------- foreign folders built from the documented layout


@pytest.mark.parametrize("apply", [True, False])
def test_standard_honours_apply_b_dec_to_input(tmp_path, apply):
    t = rand_tensors()
    write_folder(tmp_path, base_cfg("standard", apply_b_dec_to_input=apply), t)
    sae = load_any(tmp_path)
    assert sae.architecture == "relu" and sae.cfg.apply_b_dec_to_input is apply
    x = inputs()
    ref = torch.relu((x - t["b_dec"] * apply) @ t["W_enc"] + t["b_enc"])
    assert torch.equal(sae.encode(x), ref)


def test_topk_rescale_acts_by_decoder_norm_is_folded(tmp_path):
    t = rand_tensors()  # decoder rows far from unit norm
    write_folder(tmp_path, base_cfg("topk", k=5, rescale_acts_by_decoder_norm=True), t)
    imp = read_any(tmp_path)
    assert any("rescale_acts_by_decoder_norm" in n for n in imp.notes)
    x = inputs()
    norms = t["W_dec"].norm(dim=1)
    ref = topk_dense(((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * norms, 5)  # SAELens' encode
    got = imp.sae.encode(x)
    assert torch.equal(got > 0, ref > 0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # decoding divides the norms back out: the reconstruction is SAELens' too
    torch.testing.assert_close(imp.sae.decode(got), (ref / norms) @ t["W_dec"] + t["b_dec"], rtol=1e-5, atol=1e-5)


def test_jumprelu_threshold_and_negative_thresholds(tmp_path):
    theta = torch.linspace(-0.5, 1.5, D_SAE)
    t = rand_tensors(threshold=theta)
    write_folder(tmp_path, base_cfg("jumprelu", apply_b_dec_to_input=False), t)
    imp = read_any(tmp_path)
    assert any("negative threshold" in n for n in imp.notes)
    x = inputs()
    pre = x @ t["W_enc"] + t["b_enc"]
    ref = torch.relu(pre) * (pre > theta)  # SAELens: ReLU first, then the jump
    assert torch.equal(imp.sae.encode(x), ref)


def test_log_threshold_spelling(tmp_path):
    log_t = torch.log(0.1 + torch.rand(D_SAE, generator=torch.Generator().manual_seed(3)))
    write_folder(tmp_path, base_cfg("jumprelu"), rand_tensors(log_threshold=log_t))
    sae = load_any(tmp_path)
    assert torch.equal(sae.log_threshold, log_t)


def test_gated(tmp_path):
    g = torch.Generator().manual_seed(5)
    t = rand_tensors()
    t.pop("b_enc")
    t.update(b_gate=0.2 * torch.randn(D_SAE, generator=g), b_mag=0.2 * torch.randn(D_SAE, generator=g),
             r_mag=0.2 * torch.randn(D_SAE, generator=g))
    write_folder(tmp_path, base_cfg("gated"), t)
    sae = load_any(tmp_path)
    x = inputs()
    xc = x - t["b_dec"]
    ref = ((xc @ t["W_enc"] + t["b_gate"]) > 0).float() * torch.relu(xc @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    torch.testing.assert_close(sae.encode(x), ref, rtol=1e-6, atol=1e-6)


def test_expected_average_only_in(tmp_path):
    t = rand_tensors()
    write_folder(tmp_path, base_cfg("standard", normalize_activations="expected_average_only_in"), t)
    with pytest.raises(SaeforgeError, match="scaling.factor"):
        load_any(tmp_path)
    s = 0.25
    x = inputs()
    ref = torch.relu((s * x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])  # the trained SAE on scaled inputs
    torch.testing.assert_close(load_any(tmp_path, scaling_factor=s).encode(x), ref, rtol=1e-5, atol=1e-5)
    (tmp_path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s}))
    torch.testing.assert_close(load_any(tmp_path).encode(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm", "covariance_whitening"])
def test_run_time_normalisation_refused(tmp_path, norm):
    write_folder(tmp_path, base_cfg("standard", normalize_activations=norm), rand_tensors())
    with pytest.raises(SaeforgeError, match=norm):
        load_any(tmp_path)


def test_newer_saelens_version_refused(tmp_path):
    cfg = base_cfg("standard")
    cfg["metadata"]["sae_lens_version"] = "7.1.0"
    write_folder(tmp_path, cfg, rand_tensors())
    with pytest.raises(SaeforgeError, match="7.1.0.*newer"):
        load_any(tmp_path)


def test_pre_6_config_migrated(tmp_path):
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "hook_point": "blocks.2.hook_resid_pre",
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}, "normalize_activations": False,
           "apply_b_dec_to_input": True, "context_size": 128}
    t = rand_tensors()
    write_folder(tmp_path, cfg, t)
    imp = read_any(tmp_path)
    assert imp.sae.architecture == "topk" and imp.sae.cfg.k == 3
    assert imp.metadata["hook_name"] == "blocks.2.hook_resid_pre" and imp.metadata["context_size"] == 128
    x = inputs()
    assert torch.equal(imp.sae.encode(x), topk_dense((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"], 3))


def test_unknown_and_missing_tensors_named(tmp_path):
    write_folder(tmp_path / "u", base_cfg("standard"), rand_tensors(W_skip=torch.zeros(D_IN, D_IN), mystery=torch.ones(2)))
    with pytest.raises(SaeforgeError, match="W_skip, mystery"):
        load_any(tmp_path / "u")
    t = rand_tensors()
    del t["b_enc"]
    write_folder(tmp_path / "m", base_cfg("standard"), t)
    with pytest.raises(SaeforgeError, match="lacks tensor.*b_enc"):
        load_any(tmp_path / "m")


@pytest.mark.parametrize("arch", ["skip_transcoder", "temporal", "batchtopk", "no_such_thing"])
def test_unsupported_architectures_refused(tmp_path, arch):
    write_folder(tmp_path, base_cfg(arch, k=4), rand_tensors())
    with pytest.raises(SaeforgeError, match=arch):
        load_any(tmp_path)


def test_wrong_shapes_refused(tmp_path):
    t = rand_tensors()
    t["W_enc"] = torch.randn(D_IN + 1, D_SAE)
    write_folder(tmp_path, base_cfg("standard"), t)
    with pytest.raises(SaeforgeError, match="W_enc"):
        load_any(tmp_path)


def test_damaged_and_missing_files(tmp_path):
    sae = build("topk")
    save_as(sae, tmp_path / "a", "saelens")
    (tmp_path / "a" / "cfg.json").write_text("{not json")
    with pytest.raises(SaeforgeError, match="not valid JSON"):
        load_any(tmp_path / "a")
    save_as(sae, tmp_path / "b", "saelens")
    w = tmp_path / "b" / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(SaeforgeError, match="not a readable safetensors"):
        load_any(tmp_path / "b")
    save_as(sae, tmp_path / "c", "saelens")
    w = tmp_path / "c" / "sae_weights.safetensors"
    w.unlink()
    with pytest.raises(SaeforgeError, match="sae_weights.safetensors is missing"):
        load_any(tmp_path / "c")


def test_jumprelu_transcoder_without_d_out_or_apply_fields(tmp_path):
    """SAELens transcoder configs never subtract b_dec; a missing d_out comes from b_dec's length."""
    g = torch.Generator().manual_seed(2)
    t = rand_tensors(W_dec=torch.randn(D_SAE, 7, generator=g), b_dec=torch.randn(7, generator=g),
                     threshold=torch.full((D_SAE,), 0.1))
    cfg = base_cfg("jumprelu_transcoder")
    del cfg["apply_b_dec_to_input"]
    write_folder(tmp_path, cfg, t)
    sae = load_any(tmp_path)
    assert sae.cfg.d_out == 7 and sae.cfg.apply_b_dec_to_input is False
    x = inputs()
    pre = x @ t["W_enc"] + t["b_enc"]
    assert torch.equal(sae.encode(x), torch.relu(pre) * (pre > 0.1))


@pytest.mark.parametrize("arch", ["jumprelu_transcoder", "jumprelu_skip_transcoder", "batchtopk_skip_transcoder"])
def test_transcoders_round_trip_through_plain_saelens_folders(tmp_path, arch):
    """JumpReLU-shaped (skip) transcoders have SAELens forms; a residual -> residual one stays a transcoder."""
    from tests.saes.test_transcoder import build as build_transcoder

    sae = build_transcoder(arch, d_out=None)
    save_as(sae, tmp_path, "saelens", metadata={"hook_name": "layers.1.resid_pre", "hook_name_out": "layers.1.resid_post"})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == ("jumprelu_skip_transcoder" if "skip" in arch else "jumprelu_transcoder")
    assert cfg["d_out"] == cfg["d_in"]
    back = load_any(tmp_path)
    assert back.architecture == cfg["architecture"] and back.cfg.is_transcoder
    x = inputs()
    assert torch.equal(back.encode(x), sae.encode(x))
    torch.testing.assert_close(back(x), sae(x), rtol=1e-6, atol=1e-6)


def test_topk_transcoders_and_multi_site_dictionaries_have_no_saelens_form(tmp_path):
    from saeforge.saes import TopKCLTConfig, TopKSkipTranscoderConfig

    for cfg in (TopKSkipTranscoderConfig(d_in=8, d_sae=16, k=2),
                TopKCLTConfig(d_in=16, d_sae=32, d_out=16, n_layers=2, k=2)):
        with pytest.raises(SaeforgeError, match="SAELens has no"):
            save_as(make_sae(cfg), tmp_path / cfg.architecture, "saelens")
