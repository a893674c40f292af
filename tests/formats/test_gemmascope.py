"""Gemma Scope 1 (params.npz) and 2 (params.safetensors + config.json), built from the documented keys/shapes and
compared with the documented JumpReLU ``pre * (pre > threshold)`` (no b_dec subtraction); orientation detection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saeforge.errors import SaeforgeError
from saeforge.formats import detect_format, load_any, read_any

from .helpers import D_IN, D_SAE, inputs


def gs_params(d_in: int = D_IN, d_sae: int = D_SAE, d_out: int | None = None, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    d_out = d_in if d_out is None else d_out
    return {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5, "W_dec": torch.randn(d_sae, d_out, generator=g),
            "b_enc": 0.2 * torch.randn(d_sae, generator=g), "b_dec": 0.3 * torch.randn(d_out, generator=g),
            "threshold": 0.05 + 0.4 * torch.rand(d_sae, generator=g)}


def save_npz(path, params: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: v.numpy() for k, v in params.items()})


def reference(p: dict, x: torch.Tensor) -> torch.Tensor:
    pre = x @ p["W_enc"] + p["b_enc"]
    return pre * (pre > p["threshold"])


def test_gemmascope1_round_trip(tmp_path):
    p = gs_params()
    file = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_50" / "params.npz"
    save_npz(file, p)
    assert detect_format(file.parent) == ("gemmascope", file.parent)
    imp = read_any(file.parent)
    sae = imp.sae
    assert sae.architecture == "jumprelu" and sae.cfg.apply_b_dec_to_input is False
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, D_SAE)
    x = inputs()
    assert torch.equal(sae.encode(x), reference(p, x))
    f = sae.encode(x)
    torch.testing.assert_close(sae.decode(f), f @ p["W_dec"] + p["b_dec"])
    assert imp.metadata["model_name"] == "google/gemma-2-2b" and imp.metadata["hook_name"] == "layers.3.resid_post"
    assert imp.metadata["average_l0"] == 50


def test_lowercase_keys(tmp_path):
    p = gs_params()
    save_npz(tmp_path / "params.npz", {("w_" + k[2:] if k.startswith("W_") else k): v for k, v in p.items()})
    x = inputs()
    assert torch.equal(load_any(tmp_path / "params.npz").encode(x), reference(p, x))


def test_transposed_storage_detected_from_shapes(tmp_path):
    p = gs_params()
    stored = dict(p, W_enc=p["W_enc"].T.contiguous(), W_dec=p["W_dec"].T.contiguous())
    save_npz(tmp_path / "params.npz", stored)
    imp = read_any(tmp_path)
    assert any("transposed" in n for n in imp.notes)
    x = inputs()
    assert torch.equal(imp.sae.encode(x), reference(p, x))


def test_transcoder_shapes(tmp_path):
    p = gs_params(d_out=7)
    save_npz(tmp_path / "params.npz", p)
    sae = load_any(tmp_path)
    assert sae.cfg.d_out == 7 and sae.cfg.d_in == D_IN
    x = inputs()
    assert torch.equal(sae.encode(x), reference(p, x))


def test_square_without_metadata_refused_and_hint(tmp_path):
    p = gs_params(d_in=D_SAE)
    save_npz(tmp_path / "params.npz", p)
    with pytest.raises(SaeforgeError, match="(?s)square.*orientation="):
        load_any(tmp_path)
    with pytest.raises(SaeforgeError, match="square"):
        load_any(tmp_path, d_in=D_SAE)  # d_in cannot tell a square matrix's axes apart
    x = inputs(d=D_SAE)
    assert torch.equal(load_any(tmp_path, orientation="x_at_W").encode(x), reference(p, x))
    lin = load_any(tmp_path, orientation="linear")
    assert torch.equal(lin.W_enc, p["W_enc"].T)
    with pytest.raises(SaeforgeError, match="unknown orientation"):
        load_any(tmp_path, orientation="sideways")


def test_d_in_hint_checked(tmp_path):
    save_npz(tmp_path / "params.npz", gs_params())
    assert load_any(tmp_path, d_in=D_IN).cfg.d_in == D_IN
    with pytest.raises(SaeforgeError, match="fits neither"):
        load_any(tmp_path, d_in=D_IN + 1)


def test_refusals(tmp_path):
    p = gs_params()
    save_npz(tmp_path / "neg" / "params.npz", dict(p, threshold=p["threshold"] - 1.0))
    with pytest.raises(SaeforgeError, match="negative"):
        load_any(tmp_path / "neg")
    save_npz(tmp_path / "unk" / "params.npz", dict(p, W_skip=torch.zeros(D_IN, D_IN)))
    with pytest.raises(SaeforgeError, match="W_skip"):
        load_any(tmp_path / "unk")
    q = dict(p)
    del q["threshold"]
    save_npz(tmp_path / "mis" / "params.npz", q)
    with pytest.raises(SaeforgeError, match="lacks.*threshold"):
        load_any(tmp_path / "mis")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "params.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SaeforgeError, match="not a readable .npz"):
        load_any(tmp_path / "bad")


def write_gs2(folder, params: dict, **cfg) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k.lower() if k.startswith("W_") else k: v.contiguous() for k, v in params.items()},
              str(folder / "params.safetensors"))
    config = {"architecture": "jump_relu", "hf_hook_point_in": "model.layers.5.output", "width": D_SAE, "l0": "small",
              "model_name": "gemma-3-270m-pt", "affine_connection": False, "type": "sae"}
    config.update(cfg)
    (folder / "config.json").write_text(json.dumps(config))


def test_gemmascope2_round_trip(tmp_path):
    p = gs_params()
    folder = tmp_path / "resid_post" / "layer_5_width_16k_l0_small"
    write_gs2(folder, p)
    assert detect_format(folder) == ("gemmascope2", folder)
    imp = read_any(folder / "params.safetensors")
    x = inputs()
    assert torch.equal(imp.sae.encode(x), reference(p, x))
    # the HF hook model.layers.5.output is saeforge's layers.5.resid_post
    assert imp.metadata["hook_name"] == "layers.5.resid_post" and imp.metadata["reads"] == ["layers.5.resid_post"]
    assert imp.metadata["model_name"] == "google/gemma-3-270m-pt" and imp.sae.architecture == "jumprelu"


def test_gemmascope2_square_uses_documented_layout(tmp_path):
    p = gs_params(d_in=D_SAE)
    write_gs2(tmp_path, p)
    x = inputs(d=D_SAE)
    assert torch.equal(load_any(tmp_path).encode(x), reference(p, x))


@pytest.mark.parametrize("cfg, match", [({"architecture": "relu"}, "relu"), ({"affine_connection": True}, "affine")])
def test_gemmascope2_refusals(tmp_path, cfg, match):
    write_gs2(tmp_path, gs_params(), **cfg)
    with pytest.raises(SaeforgeError, match=match):
        load_any(tmp_path)


def test_gemmascope2_missing_config(tmp_path):
    write_gs2(tmp_path, gs_params())
    (tmp_path / "config.json").unlink()
    with pytest.raises(SaeforgeError, match="config.json is missing"):
        load_any(tmp_path)


# ---------------------------------------------------------------------------------------------- transcoders, CLTs
def test_gemmascope2_affine_transcoder_against_the_documented_formula(tmp_path):
    """transcoder_all/..._affine: f = pre * (pre > θ), out = f W_dec + b_dec + x A (A stored [d_in, d_out])."""
    p = gs_params(d_out=7)
    a = 0.2 * torch.randn(D_IN, 7, generator=torch.Generator().manual_seed(4))
    write_gs2(tmp_path, dict(p, affine_skip_connection=a), affine_connection=True, type="transcoder",
              hf_hook_point_in="model.layers.4.pre_feedforward_layernorm.output",
              hf_hook_point_out="model.layers.4.post_feedforward_layernorm.output")
    imp = read_any(tmp_path)
    assert imp.sae.architecture == "jumprelu_skip_transcoder"
    x = inputs()
    f = reference(p, x)
    assert torch.equal(imp.sae.encode(x), f)
    torch.testing.assert_close(imp.sae(x), f @ p["W_dec"] + p["b_dec"] + x @ a, rtol=1e-5, atol=1e-5)
    assert imp.metadata["reads"] == ["layers.4.mlp_in"] and imp.metadata["writes"] == ["layers.4.mlp_out"]


def test_gemmascope2_transcoder_of_equal_widths_is_a_transcoder(tmp_path):
    write_gs2(tmp_path, gs_params(), hf_hook_point_in="model.layers.4.pre_feedforward_layernorm.output",
              hf_hook_point_out="model.layers.4.post_feedforward_layernorm.output", type="transcoder")
    sae = load_any(tmp_path)
    assert sae.architecture == "jumprelu_transcoder" and sae.cfg.d_out == sae.cfg.d_in


@pytest.mark.parametrize("arch", ["jumprelu_transcoder", "jumprelu_skip_transcoder", "batchtopk_transcoder"])
def test_gemmascope2_transcoder_round_trip(tmp_path, arch):
    from saeforge.formats import save_as
    from saeforge.saes import make_sae
    from tests.saes.test_transcoder import build

    sae = build(arch, d_in=D_IN, d_out=7)
    meta = {"reads": ["layers.3.mlp_in"], "writes": ["layers.3.mlp_out"], "model_name": "google/gemma-3-270m-pt"}
    save_as(sae, tmp_path, "gemmascope2", metadata=meta)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["hf_hook_point_in"] == "model.layers.3.pre_feedforward_layernorm.output"
    assert cfg["hf_hook_point_out"] == "model.layers.3.post_feedforward_layernorm.output"
    assert cfg["affine_connection"] is sae.cfg.skip_connection and cfg["type"] == "transcoder"
    imp = read_any(tmp_path)
    assert imp.metadata["reads"] == meta["reads"] and imp.metadata["writes"] == meta["writes"]
    x = inputs()
    assert torch.equal(imp.sae.encode(x) > 0, sae.encode(x) > 0)
    torch.testing.assert_close(imp.sae(x), sae(x), rtol=1e-6, atol=1e-6)
    assert make_sae  # noqa: the architectures all come from saeforge.saes


def gs2_clt_files(folder, n=3, d=D_IN, f=D_SAE, skip=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    files = []
    for i in range(n):
        w_dec = torch.randn(f, n, d, generator=g)
        w_dec[:, :i] = 0
        p = {"w_enc": torch.randn(d, f, generator=g) / d**0.5, "w_dec": w_dec, "b_enc": 0.2 * torch.randn(f, generator=g),
             "b_dec": 0.3 * torch.randn(d, generator=g), "threshold": 0.05 + 0.4 * torch.rand(f, generator=g)}
        if skip:
            p["affine_skip_connection"] = 0.1 * torch.randn(d, d, generator=g)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(p, str(folder / f"params_layer_{i}.safetensors"))
        files.append(p)
    return files


@pytest.mark.parametrize("skip", [False, True])
def test_gemmascope2_clt_against_the_documented_computation(tmp_path, skip):
    """A layer-i feature writes w_dec[:, j] to every later layer j; layer j adds its b_dec (and x_j A_j)."""
    files = gs2_clt_files(tmp_path, skip=skip)
    assert detect_format(tmp_path) == ("gemmascope2_clt", tmp_path)
    imp = read_any(tmp_path)
    assert imp.sae.architecture == "jumprelu_clt" and imp.sae.cfg.n_layers == 3
    assert imp.metadata["reads"] == ["layers.0.mlp_in", "layers.1.mlp_in", "layers.2.mlp_in"]
    x = inputs(d=3 * D_IN)
    xs = x.reshape(-1, 3, D_IN)
    feats = []
    for i, p in enumerate(files):
        pre = xs[:, i] @ p["w_enc"] + p["b_enc"]
        feats.append(pre * (pre > p["threshold"]))
    assert torch.equal(imp.sae.encode(x), torch.cat(feats, 1))
    out = [sum(feats[i] @ files[i]["w_dec"][:, j] for i in range(j + 1)) + files[j]["b_dec"]
           + (xs[:, j] @ files[j]["affine_skip_connection"] if skip else 0) for j in range(3)]
    torch.testing.assert_close(imp.sae(x), torch.cat(out, 1), rtol=1e-5, atol=1e-5)


def test_gemmascope2_clt_round_trip_and_refusals(tmp_path):
    from saeforge.formats import save_as
    from tests.formats.test_circuit_tracer import jump_clt, x_in

    sae = jump_clt()
    meta = {"reads": [f"layers.{i}.mlp_in" for i in range(4, 7)], "writes": [f"layers.{i}.mlp_out" for i in range(4, 7)]}
    save_as(sae, tmp_path / "clt", "gemmascope2_clt", metadata=meta)
    imp = read_any(tmp_path / "clt")
    assert imp.metadata["reads"] == meta["reads"]  # layers 4..6, from saeforge's config.json
    x = x_in(d=sae.cfg.d_in)
    assert torch.equal(imp.sae.encode(x), sae.encode(x))
    torch.testing.assert_close(imp.sae(x), sae(x), rtol=1e-6, atol=1e-6)
    files = gs2_clt_files(tmp_path / "bad")
    files[2]["w_dec"][:, 0] = 1.0  # layer 2 writing into layer 0
    save_file(files[2], str(tmp_path / "bad" / "params_layer_2.safetensors"))
    with pytest.raises(SaeforgeError, match="write to earlier layers"):
        read_any(tmp_path / "bad")
    (tmp_path / "bad" / "params_layer_1.safetensors").unlink()
    with pytest.raises(SaeforgeError, match=r"found layers \[0, 2\]"):
        read_any(tmp_path / "bad")
