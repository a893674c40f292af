"""load_any / read_any / save_as on saeforge's own format, hints, format detection, and the threshold conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.formats import detect_format, load_any, read_any, save_as
from saeforge.formats.common import log_threshold_for

from .helpers import VARIANTS, assert_same_encodings, build


@pytest.mark.parametrize("variant", VARIANTS)
def test_native_round_trip_is_exact(tmp_path, variant):
    sae = build(variant)
    save_as(sae, tmp_path, "saeforge", metadata={"hook_name": "layers.5.resid_post"})
    imp = read_any(tmp_path)
    assert imp.fmt == "saeforge" and imp.metadata["hook_name"] == "layers.5.resid_post"
    assert imp.metadata["sae_lens_version"].startswith("6.")  # so SAELens keeps metadata{} when it loads the folder
    a, b = sae.state_dict(), imp.sae.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_same_encodings(sae, imp.sae)


def test_newer_saeforge_format_version_refused(tmp_path):
    save_as(build("topk"), tmp_path, "saeforge")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["saeforge"]["format_version"] = 99
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SaeforgeError, match="format version 99"):
        load_any(tmp_path)


def test_hint_checks(tmp_path):
    save_as(build("topk"), tmp_path, "saeforge")
    with pytest.raises(SaeforgeError, match="unknown hint"):
        load_any(tmp_path, dinn=3)
    with pytest.raises(SaeforgeError, match="holds a topk SAE"):
        load_any(tmp_path, architecture="gated")
    with pytest.raises(SaeforgeError, match="d_in must be a positive integer"):
        load_any(tmp_path, d_in=-3)
    with pytest.raises(SaeforgeError, match="unknown SAE format"):
        load_any(tmp_path, fmt="onnx")
    with pytest.raises(SaeforgeError, match="cannot write"):
        save_as(build("topk"), tmp_path / "x", "gemmascope")
    assert load_any(tmp_path, device="cpu").device.type == "cpu"


def test_detection(tmp_path):
    save_as(build("topk"), tmp_path / "native", "saeforge")
    save_as(build("topk"), tmp_path / "lens", "saelens")
    save_as(build("topk"), tmp_path / "run" / "layers.3", "sparsify")
    save_as(build("topk"), tmp_path / "run" / "layers.4", "sparsify")
    (tmp_path / "gs").mkdir()
    np.savez(tmp_path / "gs" / "params.npz", b_enc=np.zeros(3, dtype=np.float32))
    (tmp_path / "dl").mkdir()
    torch.save({}, tmp_path / "dl" / "ae.pt")
    assert detect_format(tmp_path / "native") == ("saeforge", tmp_path / "native")
    assert detect_format(tmp_path / "native" / "cfg.json") == ("saeforge", tmp_path / "native")
    assert detect_format(tmp_path / "lens" / "sae_weights.safetensors") == ("saelens", tmp_path / "lens")
    assert detect_format(tmp_path / "run" / "layers.3" / "sae.safetensors")[0] == "sparsify"
    assert detect_format(tmp_path / "gs") == ("gemmascope", tmp_path / "gs")
    assert detect_format(tmp_path / "gs" / "params.npz") == ("gemmascope", tmp_path / "gs" / "params.npz")
    assert detect_format(tmp_path / "dl" / "ae.pt")[0] == "dictionary_learning"
    with pytest.raises(SaeforgeError, match="several SAEs.*layers.3.*layers.4"):
        detect_format(tmp_path / "run")
    with pytest.raises(SaeforgeError, match="does not exist"):
        detect_format(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaeforgeError, match="no SAE files"):
        detect_format(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SaeforgeError, match="cannot tell the format of the file"):
        detect_format(tmp_path / "notes.txt")


def test_log_threshold_reproduces_thresholds():
    theta = torch.tensor([0.0, 1e-3, 0.05, 0.37, 1.0, 2.5, 7.0, 150.0], dtype=torch.float32)
    lt = log_threshold_for(theta, torch.float32)
    assert lt[0] == -float("inf")
    back = torch.exp(lt)
    within = theta.abs() * torch.finfo(torch.float32).eps  # exact where reachable, else within one ulp
    assert bool(((back - theta).abs() <= within).all())
    mid = (theta > 1 / np.e) & (theta < np.e)
    assert torch.equal(back[mid], theta[mid])
    rnd = 0.4 + 2.0 * torch.rand(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.exp(log_threshold_for(rnd, torch.float32)), rnd)
