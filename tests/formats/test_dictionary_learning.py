"""dictionary_learning ae.pt state dicts for every supported dict_class, built from the documented keys/shapes and
compared with each class's documented encode; config.json, ambiguity, orientation and damaged files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from saeforge.errors import SaeforgeError
from saeforge.formats import detect_format, load_any, read_any

from .helpers import D_IN, D_SAE, inputs, topk_dense

K = 5


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def linear_keys(seed=0) -> dict:
    gen = g(seed)
    return {"encoder.weight": torch.randn(D_SAE, D_IN, generator=gen) / D_IN**0.5,
            "encoder.bias": 0.2 * torch.randn(D_SAE, generator=gen),
            "decoder.weight": torch.randn(D_IN, D_SAE, generator=gen)}


def pow2_rows(n_rows: int, width: int, seed=0) -> torch.Tensor:
    """Rows 2^s * (one-hot): their norms are exact powers of two, so folding them is exact."""
    gen = g(seed)
    m = torch.zeros(n_rows, width)
    cols = torch.randint(0, width, (n_rows,), generator=gen)
    scales = 2.0 ** torch.randint(-2, 3, (n_rows,), generator=gen).float()
    m[torch.arange(n_rows), cols] = scales
    return m


def state_for(cls: str, seed=0, pow2=False) -> dict:
    gen = g(seed + 100)
    if cls == "AutoEncoder":
        return {**linear_keys(seed), "bias": 0.3 * torch.randn(D_IN, generator=gen)}
    if cls == "AutoEncoderNew":
        return {**linear_keys(seed), "decoder.bias": 0.3 * torch.randn(D_IN, generator=gen)}
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {**linear_keys(seed), "b_dec": 0.3 * torch.randn(D_IN, generator=gen),
                "k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.35)}
    if cls == "MatryoshkaBatchTopKSAE":
        return {"W_enc": torch.randn(D_IN, D_SAE, generator=gen) / D_IN**0.5, "b_enc": 0.2 * torch.randn(D_SAE, generator=gen),
                "W_dec": torch.randn(D_SAE, D_IN, generator=gen), "b_dec": 0.3 * torch.randn(D_IN, generator=gen),
                "k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.35),
                "group_sizes": torch.tensor([8, 8, D_SAE - 16])}
    if cls == "JumpReluAutoEncoder":
        w_dec = pow2_rows(D_SAE, D_IN, seed) if pow2 else torch.randn(D_SAE, D_IN, generator=gen)
        return {"W_enc": torch.randn(D_IN, D_SAE, generator=gen) / D_IN**0.5, "b_enc": 0.2 * torch.randn(D_SAE, generator=gen),
                "W_dec": w_dec, "b_dec": 0.3 * torch.randn(D_IN, generator=gen),
                "threshold": torch.linspace(-0.2, 0.6, D_SAE)}
    if cls == "GatedAutoEncoder":
        lk = linear_keys(seed)
        dec = pow2_rows(D_SAE, D_IN, seed).T.contiguous() if pow2 else lk["decoder.weight"]
        return {"encoder.weight": lk["encoder.weight"], "decoder.weight": dec,
                "decoder_bias": 0.3 * torch.randn(D_IN, generator=gen), "r_mag": 0.2 * torch.randn(D_SAE, generator=gen),
                "gate_bias": 0.2 * torch.randn(D_SAE, generator=gen), "mag_bias": 0.2 * torch.randn(D_SAE, generator=gen)}
    raise KeyError(cls)


def reference_encode(cls: str, s: dict, x: torch.Tensor, linear=F.linear) -> torch.Tensor:
    """dictionary_learning's encode for each class, from its documented formula."""
    if cls == "AutoEncoder":
        return torch.relu(linear(x - s["bias"], s["encoder.weight"], s["encoder.bias"]))
    if cls == "AutoEncoderNew":
        return torch.relu(linear(x, s["encoder.weight"], s["encoder.bias"]))
    if cls == "AutoEncoderTopK":
        return topk_dense(linear(x - s["b_dec"], s["encoder.weight"], s["encoder.bias"]), K)
    if cls == "BatchTopKSAE":
        p = torch.relu(linear(x - s["b_dec"], s["encoder.weight"], s["encoder.bias"]))
        return p * (p > s["threshold"])
    if cls == "MatryoshkaBatchTopKSAE":
        p = torch.relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
        return p * (p > s["threshold"])
    if cls == "JumpReluAutoEncoder":
        pre = x @ s["W_enc"] + s["b_enc"]
        return torch.relu(pre * (pre > s["threshold"])) * s["W_dec"].norm(dim=1)
    if cls == "GatedAutoEncoder":
        x_enc = F.linear(x - s["decoder_bias"], s["encoder.weight"])
        gate = (x_enc + s["gate_bias"] > 0).float()
        mag = torch.relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
        return gate * mag * s["decoder.weight"].norm(dim=0, keepdim=True)
    raise KeyError(cls)


def reference_decode(cls: str, s: dict, f: torch.Tensor) -> torch.Tensor:
    if cls == "JumpReluAutoEncoder":
        return (f / s["W_dec"].norm(dim=1)) @ s["W_dec"] + s["b_dec"]
    if cls == "GatedAutoEncoder":
        return F.linear(f / s["decoder.weight"].norm(dim=0, keepdim=True), s["decoder.weight"]) + s["decoder_bias"]
    if cls == "MatryoshkaBatchTopKSAE":
        return f @ s["W_dec"] + s["b_dec"]
    bias = {"AutoEncoder": "bias", "AutoEncoderNew": "decoder.bias"}.get(cls, "b_dec")
    return F.linear(f, s["decoder.weight"]) + s[bias]


def write(folder, state: dict, dict_class: str | None = None, name: str = "ae.pt", **trainer) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / name)
    if dict_class is not None:
        cfg = {"trainer": {"dict_class": dict_class, "activation_dim": D_IN, "dict_size": D_SAE,
                           "lm_name": "EleutherAI/pythia-70m-deduped", "layer": 3, **trainer},
               "buffer": {"ctx_len": 128}}
        (folder / "config.json").write_text(json.dumps(cfg))


ARCH = {"AutoEncoder": "relu", "AutoEncoderNew": "relu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
        "MatryoshkaBatchTopKSAE": "matryoshka", "JumpReluAutoEncoder": "jumprelu", "GatedAutoEncoder": "gated"}


@pytest.mark.parametrize("cls", list(ARCH))
def test_every_class_matches_its_encode(tmp_path, cls):
    s = state_for(cls)
    write(tmp_path, s, dict_class=cls)
    assert detect_format(tmp_path) == ("dictionary_learning", tmp_path)
    imp = read_any(tmp_path)
    assert imp.sae.architecture == ARCH[cls]
    assert imp.metadata["model_name"] == "EleutherAI/pythia-70m-deduped" and imp.metadata["context_size"] == 128
    x = inputs()
    got, ref = imp.sae.encode(x), reference_encode(cls, s, x)
    assert (ref > 0).any()
    assert torch.equal(got > 0, ref > 0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(imp.sae.decode(got), reference_decode(cls, s, ref), rtol=1e-4, atol=1e-4)


def x_at_wt(x, w, b):
    """nn.Linear's formula evaluated as saeforge evaluates it (x @ W_enc with W_enc = weight.T), so that the
    comparison can be bit-exact; F.linear runs another kernel and differs in the last bits."""
    return x @ w.T.contiguous() + b


@pytest.mark.parametrize("cls", ["AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE"])
def test_identical_encodings_linear_classes(tmp_path, cls):
    s = state_for(cls)
    write(tmp_path, s, dict_class=cls)
    x = inputs()
    assert torch.equal(load_any(tmp_path).encode(x), reference_encode(cls, s, x, linear=x_at_wt))


@pytest.mark.parametrize("cls", ["JumpReluAutoEncoder", "GatedAutoEncoder", "MatryoshkaBatchTopKSAE"])
def test_identical_encodings_when_folding_is_exact(tmp_path, cls):
    """With power-of-two decoder norms, folding them is exact: the encodings are bit-identical."""
    s = state_for(cls, pow2=True)
    write(tmp_path, s, dict_class=cls)
    x = inputs()
    got = load_any(tmp_path).encode(x)
    ref = reference_encode(cls, s, x) if cls != "GatedAutoEncoder" else None
    if cls == "GatedAutoEncoder":  # same products as saeforge (x @ W.T rather than F.linear): bitwise comparable
        x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T.contiguous()
        n = s["decoder.weight"].norm(dim=0)
        x_enc_n = (x - s["decoder_bias"]) @ (s["encoder.weight"].T * n).contiguous()
        assert torch.equal(x_enc_n, x_enc * n)
        ref = ((x_enc + s["gate_bias"]) > 0).float() * torch.relu(s["r_mag"].exp() * x_enc + s["mag_bias"]) * n
    assert torch.equal(got, ref)


def test_topk_and_batchtopk_ambiguous_without_config(tmp_path):
    s = state_for("BatchTopKSAE")
    write(tmp_path, s)
    with pytest.raises(SaeforgeError, match="(?s)same keys.*architecture='topk'"):
        load_any(tmp_path)
    x = inputs()
    bt = load_any(tmp_path, architecture="batchtopk")
    assert bt.architecture == "batchtopk"
    torch.testing.assert_close(bt.encode(x), reference_encode("BatchTopKSAE", s, x), rtol=1e-5, atol=1e-5)
    assert load_any(tmp_path / "ae.pt", architecture="topk").architecture == "topk"
    with pytest.raises(SaeforgeError, match="unknown architecture hint"):
        load_any(tmp_path, architecture="transformer")


def test_config_and_hint_conflict(tmp_path):
    write(tmp_path, state_for("AutoEncoderTopK"), dict_class="AutoEncoderTopK")
    with pytest.raises(SaeforgeError, match="dict_class='AutoEncoderTopK'"):
        load_any(tmp_path, architecture="batchtopk")


def test_classes_inferred_from_keys_without_config(tmp_path):
    for cls in ("AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):
        write(tmp_path / cls, state_for(cls))
        assert load_any(tmp_path / cls).architecture == ARCH[cls]


def test_checkpoint_finds_config_one_level_up(tmp_path):
    s = state_for("AutoEncoderTopK")
    (tmp_path / "checkpoints").mkdir()
    torch.save(s, tmp_path / "checkpoints" / "ae_100.pt")
    write(tmp_path, state_for("AutoEncoderTopK"), dict_class="AutoEncoderTopK")
    imp = read_any(tmp_path / "checkpoints" / "ae_100.pt")
    assert imp.sae.architecture == "topk" and imp.metadata["layer"] == 3


def test_unlearned_batchtopk_threshold_noted(tmp_path):
    s = dict(state_for("BatchTopKSAE"), threshold=torch.tensor(-1.0))
    write(tmp_path, s, dict_class="BatchTopKSAE")
    imp = read_any(tmp_path)
    assert any("never learned" in n for n in imp.notes)
    assert not imp.sae.threshold_learned


def test_square_w_enc_needs_config_or_hint(tmp_path):
    gen = g(7)
    s = {"W_enc": torch.randn(D_SAE, D_SAE, generator=gen), "b_enc": torch.zeros(D_SAE),
         "W_dec": torch.randn(D_SAE, D_SAE, generator=gen), "b_dec": torch.zeros(D_SAE),
         "threshold": torch.full((D_SAE,), 0.1)}
    write(tmp_path / "bare", s)
    with pytest.raises(SaeforgeError, match="square"):
        load_any(tmp_path / "bare")
    lin = load_any(tmp_path / "bare", orientation="linear")  # W_enc stored [d_sae, d_in], W_dec [d_in, d_sae]
    torch.testing.assert_close(lin.W_dec, s["W_dec"].T / s["W_dec"].T.norm(dim=1, keepdim=True))
    write(tmp_path / "cfg", s)
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "JumpReluAutoEncoder"}}))
    x = inputs(d=D_SAE)
    pre = x @ s["W_enc"] + s["b_enc"]
    ref = torch.relu(pre * (pre > 0.1)) * s["W_dec"].norm(dim=1)
    torch.testing.assert_close(load_any(tmp_path / "cfg").encode(x), ref, rtol=1e-5, atol=1e-5)


def test_linear_keys_transposed_are_detected(tmp_path):
    s = state_for("AutoEncoder")
    stored = dict(s, **{"encoder.weight": s["encoder.weight"].T.contiguous()})
    write(tmp_path, stored)
    imp = read_any(tmp_path)
    assert any("transposed" in n for n in imp.notes)
    x = inputs()
    torch.testing.assert_close(imp.sae.encode(x), reference_encode("AutoEncoder", s, x), rtol=1e-5, atol=1e-5)


def test_unknown_keys_named(tmp_path):
    write(tmp_path / "a", dict(state_for("AutoEncoderTopK"), act_mean=torch.zeros(D_IN)), dict_class="AutoEncoderTopK")
    with pytest.raises(SaeforgeError, match="act_mean"):
        load_any(tmp_path / "a")
    write(tmp_path / "b", dict(state_for("AutoEncoder"), mystery=torch.zeros(3)))
    with pytest.raises(SaeforgeError, match="(?s)fit no dictionary_learning class.*mystery"):
        load_any(tmp_path / "b")
    write(tmp_path / "c", state_for("AutoEncoder"), dict_class="CrossCoder")
    with pytest.raises(SaeforgeError, match="CrossCoder"):
        load_any(tmp_path / "c")


class NotATensor:
    pass


def test_damaged_and_unsafe_pickles(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ae.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(SaeforgeError, match="not a readable torch state_dict"):
        load_any(tmp_path / "a")
    (tmp_path / "b").mkdir()
    torch.save({"encoder.weight": torch.zeros(2, 2), "obj": NotATensor()}, tmp_path / "b" / "ae.pt")
    with pytest.raises(SaeforgeError, match="weights_only"):
        load_any(tmp_path / "b")
    (tmp_path / "c").mkdir()
    torch.save({"encoder.weight": torch.zeros(2, 2), "note": "hello"}, tmp_path / "c" / "ae.pt")
    with pytest.raises(SaeforgeError, match="non-tensor entries: note"):
        load_any(tmp_path / "c")
    (tmp_path / "d").mkdir()
    torch.save([torch.zeros(1)], tmp_path / "d" / "ae.pt")
    with pytest.raises(SaeforgeError, match="not a state_dict"):
        load_any(tmp_path / "d")
    (tmp_path / "e").mkdir()
    with pytest.raises(SaeforgeError, match="cannot tell the format"):
        load_any(tmp_path / "e")
