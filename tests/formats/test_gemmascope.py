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
