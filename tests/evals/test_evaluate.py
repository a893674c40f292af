import json

import pytest
import torch

from saeforge.data.text_source import TextSource
from saeforge.data.token_stream import TokenPolicy, TokenStream
from saeforge.errors import SaeforgeError
from saeforge.evals.downstream import splice
from saeforge.evals.evaluate import EvalConfig, evaluate
from saeforge.saes import TopKConfig, make_sae, save_sae

SITE = "layers.1.resid_post"
REQUIRED = ("fvu", "explained_variance", "mse", "l0", "dead_fraction", "ce_loss_clean", "ce_loss_sae",
            "ce_loss_zero_ablation", "ce_recovered", "kl_div", "n_tokens")


def _identity_sae(d: int):
    """A TopK SAE that reconstructs exactly: latents relu(x) and relu(-x), k = d covers every positive one."""
    sae = make_sae(TopKConfig(d_in=d, d_sae=2 * d, k=d, apply_b_dec_to_input=False))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _save(sae, folder, model_dir, **meta):
    save_sae(sae, folder, metadata={"hook_name": SITE, "model_name": str(model_dir), "context_size": 32,
                                    "dataset_path": "train.txt", **meta})
    return folder


def _cfg(path, text_file, **kw):
    return EvalConfig(path=str(path), corpus=str(text_file), tokens=32 * 12, batch_size=4, device="cpu",
                      progress=False, **kw)


def test_perfect_reconstruction_gives_fvu_0_ce_recovered_1_kl_0(tiny_llama_dir, text_file, tmp_path):
    folder = _save(_identity_sae(32), tmp_path / "identity", tiny_llama_dir)
    report = evaluate(_cfg(folder, text_file, plots=False))
    m = report["saes"]["identity"]
    assert all(k in m for k in REQUIRED)
    assert m["fvu"] == 0.0 and m["mse"] == 0.0 and m["explained_variance"] == 1.0
    assert m["ce_loss_sae"] == m["ce_loss_clean"] and m["ce_recovered"] == 1.0 and m["kl_div"] == 0.0
    assert m["ce_loss_zero_ablation"] != m["ce_loss_clean"] and m["kl_div_zero_ablation"] > 0
    assert m["cosine_similarity"] == pytest.approx(1.0) and m["relative_norm"] == pytest.approx(1.0)
    saved = json.loads((folder / "eval.json").read_text())
    assert saved["schema_version"] == 1 and saved["saes"]["identity"]["ce_recovered"] == 1.0


def test_predicting_the_mean_gives_fvu_1(tiny_llama, tiny_llama_dir, text_file, tmp_path):
    ts = TokenStream.for_model(TextSource(str(text_file)), tiny_llama, TokenPolicy(context_length=32))
    ids = torch.stack([torch.from_numpy(c) for _, c in zip(range(12), ts.contexts())])
    x = tiny_llama.read(ids, [SITE])[SITE][ts.keep_mask(ids)].double()
    sae = make_sae(TopKConfig(d_in=32, d_sae=64, k=4, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.copy_(x.mean(0).float())
    folder = _save(sae, tmp_path / "mean", tiny_llama_dir)
    m = evaluate(_cfg(folder, text_file, plots=False))["saes"]["mean"]
    assert m["fvu"] == pytest.approx(1.0, abs=1e-6)
    # splicing the mean is mean ablation, so nothing of the mean-ablation gap is recovered
    assert m["ce_loss_sae"] == pytest.approx(m["ce_loss_mean_ablation"], rel=1e-6)
    assert m["ce_recovered_mean_ablation"] == pytest.approx(0.0, abs=1e-4)


def test_sae_with_its_error_term_reproduces_the_clean_logits_exactly(tiny_llama, text_file):
    ts = TokenStream.for_model(TextSource(str(text_file)), tiny_llama, TokenPolicy(context_length=32))
    ids = torch.stack([torch.from_numpy(c) for _, c in zip(range(6), ts.contexts())])
    keep = ts.keep_mask(ids)
    sae = make_sae(TopKConfig(d_in=32, d_sae=64, k=4))  # random: a poor reconstruction, a large error term
    clean = tiny_llama.logits(ids)
    with tiny_llama.edit({SITE: splice(sae, keep, "sae_with_error")}):
        spliced = tiny_llama.logits(ids)
    with tiny_llama.edit({SITE: splice(sae, keep, "sae")}):
        sae_only = tiny_llama.logits(ids)
    assert torch.equal(spliced, clean)
    assert not torch.allclose(sae_only, clean)


def test_run_directory_eval_plots_and_warning(tiny_llama_dir, text_file, tmp_path):
    from saeforge.evals.plots import have_matplotlib

    run = tmp_path / "run"
    _save(_identity_sae(32), run / "saes" / SITE, tiny_llama_dir)
    report = evaluate(_cfg(run, text_file))
    assert set(report["saes"]) == {SITE} and (run / "eval.json").is_file()
    assert "only 384 token positions" in report["warning"]
    if have_matplotlib():
        assert {p.split("/")[-1] for p in report["saes"][SITE]["plots"]} == {
            "feature_density.png", "l0_per_token.png", "activation_magnitudes.png"}


def test_bad_inputs(tiny_llama_dir, tiny_model_dirs, text_file, tmp_path):
    folder = _save(_identity_sae(32), tmp_path / "sae", tiny_llama_dir, dataset_path=str(text_file))
    with pytest.raises(SaeforgeError, match="was trained on .* overstates it"):
        evaluate(_cfg(folder, text_file))
    wide = _save(_identity_sae(16), tmp_path / "wide", tiny_llama_dir)
    with pytest.raises(SaeforgeError, match="has d_in 16 but site layers.1.resid_post .* has width 32"):
        evaluate(_cfg(wide, text_file))
    with pytest.raises(SaeforgeError, match="holds no SAE"):
        evaluate(_cfg(tmp_path, text_file))
    with pytest.raises(SaeforgeError, match="unknown site"):
        evaluate(_cfg(tmp_path / "wide", text_file, site="layers.1.nowhere"))


@pytest.mark.parametrize("tokens", [0, -1])
def test_non_positive_tokens_are_refused_and_eval_json_is_kept(tiny_llama_dir, text_file, tmp_path, tokens):
    import dataclasses

    run = tmp_path / "run"
    _save(_identity_sae(32), run / "saes" / SITE, tiny_llama_dir)
    evaluate(_cfg(run, text_file))
    before = (run / "eval.json").read_bytes()
    with pytest.raises(SaeforgeError, match=f"--tokens {tokens} asks for no tokens") as err:
        evaluate(dataclasses.replace(_cfg(run, text_file), tokens=tokens))
    assert "--tokens 16384" in err.value.fix and (run / "eval.json").read_bytes() == before
