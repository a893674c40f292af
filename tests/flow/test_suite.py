import numpy as np
import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.flow.matching import match_decoders, predecessor_matches
from saeforge.flow.suite import (AssembleConfig, SuiteConfig, assemble_suite, open_suite, parse_layers, suite_sites,
                                 suite_train_config, train_suite)
from tests.flow.helpers import topk_sae, unit, write_suite


def test_parse_layers():
    assert parse_layers("8-10,14") == [8, 9, 10, 14]
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    for bad in ("3-1", "x", "1-"):
        with pytest.raises(SaeforgeError):
            parse_layers(bad)
    with pytest.raises(SaeforgeError, match="has 30 layers"):
        parse_layers("28-30", 30)


def test_suite_sites_include_the_input_residual():
    assert suite_sites([3, 4]) == ["layers.2.resid_post", "layers.3.resid_post", "layers.3.mlp_out",
                                   "layers.3.attn_out", "layers.4.resid_post", "layers.4.mlp_out", "layers.4.attn_out"]
    assert suite_sites([0])[0] == "layers.0.resid_post"  # layer 0's input is the embedding: no SAE before it


def test_suite_config_builds_one_sae_per_site():
    cfg = suite_train_config(SuiteConfig(out="x", layers="1-2", k=8, d_sae=64), n_layers=3)
    assert [s["site"] for s in cfg.saes] == suite_sites([1, 2])
    assert all(s["name"] == s["site"] for s in cfg.saes)
    assert cfg.k == 8 and cfg.d_sae == 64


def test_train_suite_on_a_tiny_model_in_one_pass(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "suite"
    final = train_suite(SuiteConfig(out=str(out), model=str(tiny_llama_dir), corpus=str(text_file), layers="1-2",
                                    tokens=256 * 6, batch_size=256, d_sae=64, k=4, context_length=32, device="cpu",
                                    progress=False))
    assert set(final) == set(suite_sites([1, 2]))
    suite = open_suite(out)
    assert suite.analysable_layers() == [1, 2]
    assert suite.fingerprint  # recorded by the trainer: the suite knows its model
    m = predecessor_matches(suite, 2)
    assert set(m) == {"R", "M", "A"} and m["R"].indices.shape == (64, 1)
    with pytest.raises(SaeforgeError, match="layers.0.mlp_out"):
        suite.require([0, 1])


def _gemmascope_npz(sae, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, W_enc=sae.W_enc.detach().numpy(), W_dec=sae.W_dec.detach().numpy(),
             b_enc=sae.b_enc.detach().numpy(), b_dec=sae.b_dec.detach().numpy(),
             threshold=np.full(sae.cfg.d_sae, 0.01, dtype=np.float32))
    return path


def test_assemble_a_suite_from_converted_files(tmp_path):
    from saeforge.formats import save_as

    g = torch.Generator().manual_seed(0)
    w = {s: unit(48, 16, g) for s in ("layers.2.resid_post", "layers.3.resid_post", "layers.3.mlp_out",
                                      "layers.3.attn_out")}
    saes = {s: topk_sae(v) for s, v in w.items()}
    gs = _gemmascope_npz(saes["layers.2.resid_post"], tmp_path / "gemma-scope" / "layer_2" / "params.npz")
    lens = save_as(saes["layers.3.resid_post"], tmp_path / "lens", "saelens",
                   metadata={"hook_name": "blocks.3.hook_resid_post"})
    spars = save_as(saes["layers.3.mlp_out"], tmp_path / "sparsify" / "layers.3.mlp", "sparsify")
    native = save_as(saes["layers.3.attn_out"], tmp_path / "native", "saeforge",
                     metadata={"hook_name": "layers.3.attn_out"})
    suite = assemble_suite(AssembleConfig(out=str(tmp_path / "suite"), model="embedded", sae=(
        f"layers.2.resid_post={gs}", f"layers.3.resid_post={lens}", f"layers.3.mlp_out={spars}", str(native))))
    reopened = open_suite(tmp_path / "suite")
    assert list(reopened.saes) == list(suite.saes) == ["layers.2.resid_post", "layers.3.resid_post",
                                                        "layers.3.mlp_out", "layers.3.attn_out"]
    assert reopened.model_name == "embedded" and reopened.analysable_layers() == [3]
    got = predecessor_matches(reopened, 3)
    for key, site in (("R", "layers.2.resid_post"), ("M", "layers.3.mlp_out"), ("A", "layers.3.attn_out")):
        want = match_decoders(w["layers.3.resid_post"], w[site])
        assert torch.equal(got[key].top1, want.top1)
        assert torch.allclose(got[key].s, want.s, atol=1e-5)


def test_assemble_refuses_a_site_it_cannot_place(tmp_path):
    g = torch.Generator().manual_seed(1)
    from saeforge.formats import save_as

    lens = save_as(topk_sae(unit(8, 4, g)), tmp_path / "lens", "saelens", metadata={"hook_name": "blocks.3.x"})
    with pytest.raises(SaeforgeError, match="not a flow site"):
        assemble_suite(AssembleConfig(out=str(tmp_path / "s"), sae=(str(lens),)))
    with pytest.raises(SaeforgeError, match="not a flow site"):
        assemble_suite(AssembleConfig(out=str(tmp_path / "s"), sae=(f"layers.3.resid_pre={lens}",)))
    assert not (tmp_path / "s" / "suite.json").exists()


def test_suites_of_different_models_or_widths_are_refused(tmp_path):
    g = torch.Generator().manual_seed(2)
    write_suite(tmp_path / "a", {"layers.1.resid_post": unit(8, 4, g)}, {"model_fingerprint": "aaaa" * 8})
    write_suite(tmp_path / "a", {"layers.2.resid_post": unit(8, 4, g)}, {"model_fingerprint": "bbbb" * 8})
    with pytest.raises(SaeforgeError, match="different models"):
        open_suite(tmp_path / "a")
    write_suite(tmp_path / "b", {"layers.1.resid_post": unit(8, 4, g), "layers.2.resid_post": unit(8, 6, g)})
    with pytest.raises(SaeforgeError, match="different residual widths"):
        open_suite(tmp_path / "b")


def test_binding_checks_the_fingerprint(tiny_llama, tmp_path):
    g = torch.Generator().manual_seed(3)
    write_suite(tmp_path, {"layers.1.resid_post": unit(8, 32, g)}, {"model_fingerprint": "c" * 64})
    with pytest.raises(SaeforgeError, match="another model"):
        open_suite(tmp_path).bind(tiny_llama)


def test_a_suite_trained_with_the_model_in_bfloat16_binds_to_it_in_float32(tiny_llama, tiny_llama_dir, tmp_path):
    import json

    from saeforge.models.language_model import LanguageModel

    bf16 = LanguageModel.load(str(tiny_llama_dir), dtype="bfloat16", device="cpu").fingerprint()
    assert bf16 != tiny_llama.fingerprint()  # the fingerprint hashes the weights as loaded
    g = torch.Generator().manual_seed(4)
    write_suite(tmp_path, {"layers.1.resid_post": unit(8, 32, g)}, {"model_fingerprint": bf16})
    with pytest.raises(SaeforgeError, match="another model"):
        open_suite(tmp_path).bind(tiny_llama)  # nothing says the suite ran the model in bfloat16
    (tmp_path / "run.json").write_text(json.dumps({"config": {"model_dtype": "bfloat16"}}))
    assert set(open_suite(tmp_path).bind(tiny_llama)) == {"layers.1.resid_post"}
