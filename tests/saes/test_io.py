"""Native save/load: exact round trips, the SAELens-compatible layout, and clear errors for bad folders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from saeforge.errors import SaeforgeError
from saeforge.saes import load_feature_stats, load_sae, read_sae_config, save_sae
from saeforge.saes.io import FORMAT_VERSION, log10_density

from .helpers import D_IN, D_SAE, TOPK_FAMILY, batch, build, num

SAELENS_ARCH = {
    "relu_april": "standard",
    "relu_classic": "standard",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "matryoshka": "jumprelu",
    "gated": "gated",
    "jumprelu": "jumprelu",
}
SAELENS_KEYS = {
    "standard": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "topk": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "gated": {"W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"},
}


def test_round_trip_is_exact(variant, tmp_path):
    sae = build(variant)
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    before, after = sae.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    x = batch(50)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x), sae(x))
    assert not [p for p in (tmp_path / "sae").iterdir() if p.name.startswith(".tmp-")]


def test_saelens_layout(variant, tmp_path):
    sae = build(variant)
    meta = {"hook_name": "model.layers.6", "model_name": "HuggingFaceTB/SmolLM2-135M", "context_size": 128}
    save_sae(sae, tmp_path, metadata=meta)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    arch = SAELENS_ARCH[variant]
    assert cfg["architecture"] == arch
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["device"]) == (D_IN, D_SAE, "float32", "cpu")
    assert cfg["apply_b_dec_to_input"] is sae.cfg.apply_b_dec_to_input
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    assert cfg["metadata"] == {**meta, "sae_lens_version": "6.0.0"}  # the version marks the SAELens v6 layout
    section = cfg["saeforge"]
    assert section["format_version"] == FORMAT_VERSION and section["architecture"] == sae.architecture
    assert section["config"] == sae.cfg.to_dict()
    if arch == "topk":
        assert cfg["k"] == 4 and cfg["rescale_acts_by_decoder_norm"] is False
    weights = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert set(weights) == SAELENS_KEYS[arch]
    assert weights["W_enc"].shape == (D_IN, D_SAE) and weights["W_dec"].shape == (D_SAE, D_IN)
    if variant in ("batchtopk", "matryoshka"):
        assert torch.equal(weights["threshold"], torch.full((D_SAE,), num(sae.threshold)))
    if variant == "jumprelu":
        assert torch.allclose(weights["threshold"], sae.threshold)
    # the SAELens view reproduces saeforge's encoding (JumpReLU form for the BatchTopK family)
    x = batch(40)
    pre = (x - weights["b_dec"] * cfg["apply_b_dec_to_input"]) @ weights["W_enc"]
    if arch == "standard":
        f = torch.relu(pre + weights["b_enc"])
    elif arch == "jumprelu":
        pre = pre + weights["b_enc"]
        f = torch.relu(pre) * (pre > weights["threshold"])
    elif arch == "topk":
        pre = pre + weights["b_enc"]
        top = pre.topk(cfg["k"], dim=1)
        f = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
    else:
        gate = (pre + weights["b_gate"]) > 0
        f = gate * torch.relu(pre * torch.exp(weights["r_mag"]) + weights["b_mag"])
    assert torch.allclose(f, sae.encode(x), atol=1e-5)


def test_feature_stats_and_sparsity_file(tmp_path):
    sae = build("topk")
    counts = torch.arange(D_SAE, dtype=torch.float32)
    sparsity = log10_density(counts, n_tokens=1000)
    save_sae(sae, tmp_path, feature_stats={"sparsity": sparsity, "mean_activation": torch.ones(D_SAE)})
    stats = load_feature_stats(tmp_path)
    assert set(stats) == {"sparsity", "mean_activation"}
    assert torch.equal(stats["sparsity"], sparsity)
    assert num(stats["sparsity"][10]) == pytest.approx(-2.0, abs=1e-6)  # 10 / 1000 tokens
    assert load_feature_stats(tmp_path / "nowhere") is None
    with pytest.raises(SaeforgeError, match="feature statistic 'sparsity'"):
        save_sae(sae, tmp_path, feature_stats={"sparsity": torch.zeros(3)})


def test_transcoder_round_trip(tmp_path):
    sae = build("jumprelu", d_out=7)
    save_sae(sae, tmp_path, metadata={"hook_name": "a", "hook_name_out": "b"})
    cfg = read_sae_config(tmp_path)
    assert cfg["architecture"] == "jumprelu_transcoder" and cfg["d_out"] == 7 and cfg["hook_name_out"] == "b"
    loaded = load_sae(tmp_path)
    x = batch(10)
    assert loaded.cfg.d_out == 7 and torch.equal(loaded(x), sae(x))


def test_bfloat16_round_trip(tmp_path):
    sae = build("jumprelu", dtype="bfloat16")
    save_sae(sae, tmp_path)
    loaded = load_sae(tmp_path)
    assert loaded.W_enc.dtype == torch.bfloat16
    assert torch.equal(loaded.encode(batch(10)), sae.encode(batch(10)))


def test_resaving_replaces_the_files(tmp_path):
    save_sae(build("jumprelu"), tmp_path)
    assert (tmp_path / "saeforge_state.safetensors").exists()
    save_sae(build("relu_april", seed=3), tmp_path)
    assert not (tmp_path / "saeforge_state.safetensors").exists()  # relu has no extra state
    assert load_sae(tmp_path).architecture == "relu"


# ---- bad folders ----

@pytest.fixture
def saved(tmp_path):
    save_sae(build("batchtopk"), tmp_path)
    return tmp_path


def _edit_cfg(folder, change):
    cfg = json.loads((folder / "cfg.json").read_text())
    change(cfg)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def test_newer_format_version_is_refused(saved):
    _edit_cfg(saved, lambda c: c["saeforge"].__setitem__("format_version", FORMAT_VERSION + 1))
    with pytest.raises(SaeforgeError, match=f"format version {FORMAT_VERSION + 1}.*up to {FORMAT_VERSION}") as err:
        load_sae(saved)
    assert "upgrade saeforge" in err.value.fix


def test_missing_folder_and_files(saved, tmp_path):
    with pytest.raises(SaeforgeError, match="is not a folder"):
        load_sae(tmp_path / "absent")
    (saved / "saeforge_state.safetensors").unlink()
    with pytest.raises(SaeforgeError, match="saeforge_state.safetensors is missing"):
        load_sae(saved)
    (saved / "sae_weights.safetensors").unlink()
    with pytest.raises(SaeforgeError, match="sae_weights.safetensors is missing"):
        load_sae(saved)
    (saved / "cfg.json").unlink()
    with pytest.raises(SaeforgeError, match="cfg.json is missing"):
        load_sae(saved)


def test_corrupt_files(saved):
    (saved / "cfg.json").write_text("{not json")
    with pytest.raises(SaeforgeError, match="cfg.json is not valid JSON"):
        load_sae(saved)


def test_corrupt_safetensors(saved):
    data = (saved / "sae_weights.safetensors").read_bytes()
    (saved / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SaeforgeError, match="sae_weights.safetensors is not a readable safetensors file"):
        load_sae(saved)
    (saved / "sae_weights.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(SaeforgeError, match="sae_weights.safetensors is not a readable safetensors file"):
        load_sae(saved)


def test_shape_mismatch_names_file_and_tensor(saved):
    weights = load_file(str(saved / "sae_weights.safetensors"))
    weights["W_dec"] = torch.zeros(D_SAE, D_IN + 1)
    save_file(weights, str(saved / "sae_weights.safetensors"))
    with pytest.raises(SaeforgeError, match=r"sae_weights.safetensors: tensor 'W_dec' has shape \(32, 13\)"):
        load_sae(saved)


def test_missing_and_unexpected_tensors(saved):
    weights = load_file(str(saved / "sae_weights.safetensors"))
    del weights["b_enc"]
    save_file(weights, str(saved / "sae_weights.safetensors"))
    with pytest.raises(SaeforgeError, match="lacks tensor.*b_enc"):
        load_sae(saved)
    weights["b_enc"] = torch.zeros(D_SAE)
    weights["W_skip"] = torch.zeros(D_IN, D_IN)
    save_file(weights, str(saved / "sae_weights.safetensors"))
    with pytest.raises(SaeforgeError, match="unexpected tensor.*W_skip"):
        load_sae(saved)


def test_config_problems(saved):
    _edit_cfg(saved, lambda c: c.pop("saeforge"))
    with pytest.raises(SaeforgeError, match="no 'saeforge' section"):
        load_sae(saved)


def test_unknown_architecture_in_config(saved):
    _edit_cfg(saved, lambda c: c["saeforge"]["config"].__setitem__("architecture", "hyperbolic"))
    with pytest.raises(SaeforgeError, match="cfg.json: unknown SAE architecture 'hyperbolic'") as err:
        load_sae(saved)
    assert "topk" in err.value.fix


def test_invalid_config_values(saved):
    _edit_cfg(saved, lambda c: c["saeforge"]["config"].__setitem__("k", 1000))
    with pytest.raises(SaeforgeError, match="k=1000 is larger than d_sae"):
        load_sae(saved)


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(SaeforgeError, match="cannot be written as JSON"):
        save_sae(build("topk"), tmp_path, metadata={"tensor": torch.zeros(2)})
    assert not (tmp_path / "cfg.json").exists()


def test_save_refuses_non_saes(tmp_path):
    with pytest.raises(SaeforgeError, match="needs a saeforge SAE"):
        save_sae(torch.nn.Linear(2, 2), tmp_path)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(TOPK_FAMILY))
def test_training_state_survives_for_exact_resume(name, tmp_path):
    sae = build(name, threshold_start_step=0) if name != "topk" else build(name)
    from saeforge.saes import TrainState

    sae.training_loss(batch(32), state=TrainState(step=3))
    save_sae(sae, tmp_path)
    loaded = load_sae(tmp_path)
    for k, v in sae.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
