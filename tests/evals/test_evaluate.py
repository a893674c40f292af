import json

import pytest
import torch

from saeforge.data.text_source import TextSource
from saeforge.data.token_stream import TokenPolicy, TokenStream
from saeforge.errors import SaeforgeError
from saeforge.evals.downstream import replace_at, splice
from saeforge.evals.evaluate import EvalConfig, evaluate
from saeforge.saes import TopKConfig, make_sae, save_sae
from tests.training.test_trainer import mlp_cache  # noqa: F401  (a fixture: the tiny model's MLP sites, cached)

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
    return EvalConfig(**{"path": str(path), "corpus": str(text_file), "tokens": 32 * 12, "batch_size": 4,
                         "device": "cpu", "progress": False, **kw})


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


# ------------------------------------------------------------------------------------ transcoders, the fast path
def _binding_meta(model_dir, reads, writes):
    from saeforge.runs import SiteBinding

    return {**SiteBinding.single(reads, writes).to_metadata(), "model_name": str(model_dir), "context_size": 32,
            "dataset_path": "train.txt"}


def _random(d_out=None, seed=0, k=4):
    torch.manual_seed(seed)
    return make_sae(TopKConfig(d_in=32, d_sae=64, k=k, d_out=d_out, apply_b_dec_to_input=False))


def test_a_perfect_transcoder_is_a_perfect_replacement(tiny_llama_dir, text_file, tmp_path, capsys):
    # layers.0.resid_post and layers.1.resid_pre are one tensor, so the identity maps what it reads onto what it
    # replaces exactly: a transcoder whose decoder reproduces its target
    from saeforge.evals.evaluate import format_table

    run = tmp_path / "run"
    for name, sae in (("perfect", _identity_sae(32)), ("random", _random())):
        save_sae(sae, run / "saes" / name, metadata=_binding_meta(tiny_llama_dir, "layers.0.resid_post",
                                                                 "layers.1.resid_pre"))
    report = evaluate(_cfg(run, text_file, plots=False))
    perfect, rand = report["saes"]["perfect"], report["saes"]["random"]
    for m in (perfect, rand):
        assert m["kind"] == "transcoder" and m["reads"] == "layers.0.resid_post"
        assert m["writes"] == m["site"] == "layers.1.resid_pre"
    assert perfect["fvu"] == 0.0 and perfect["ce_recovered"] == 1.0 and perfect["kl_div"] == 0.0
    assert perfect["ce_loss_sae"] == perfect["ce_loss_clean"] and perfect["l0"] > 0
    # both replace the same site: the same baselines, from the same (shared) ablation forwards
    for key in ("ce_loss_clean", "ce_loss_zero_ablation", "ce_loss_mean_ablation", "kl_div_zero_ablation"):
        assert perfect[key] == rand[key]
    # a random (tied-initialisation) dictionary: a poor replacement, far from the perfect one on every figure
    assert rand["fvu"] > 0.5 and rand["ce_loss_sae"] > rand["ce_loss_clean"] and rand["ce_recovered"] < 0.9
    assert rand["kl_div"] > 0.1 * rand["kl_div_zero_ablation"] > 0
    table = format_table(report).splitlines()
    assert table[0].split()[:3] == ["SAE", "reads", "replaces"]
    assert table[1].split()[:3] == ["perfect", "layers.0.resid_post", "layers.1.resid_pre"]


def _reference_eval(lm, bound: dict, batches: list, keeps: list) -> dict:
    """The evaluation as it was before the fast path: a first pass for the means, then per batch a full clean forward
    and one full forward per SAE and mode, each log-softmaxed afresh. ``bound``: {name: (sae, reads, writes)}."""
    import torch.nn.functional as F

    from saeforge.evals.downstream import DownstreamStats
    from saeforge.evals.reconstruction import ReconstructionStats

    writes = sorted({w for _, _, w in bound.values()})
    sums, count = {w: 0 for w in writes}, 0
    for ids, keep in zip(batches, keeps):
        for w, act in lm.read(ids, writes).items():
            sums[w] = sums[w] + act[keep].double().sum(0)
        count += int(keep.sum())
    means = {w: (sums[w] / count).float() for w in writes}
    recon = {n: ReconstructionStats(32, sae.cfg.d_sae) for n, (sae, _, _) in bound.items()}
    down = {n: DownstreamStats() for n in bound}
    sites = sorted({s for _, r, w in bound.values() for s in (r, w)})
    for ids, keep in zip(batches, keeps):
        with lm.record(sites) as captured:
            clean = lm.logits(ids)
        pos = keep.clone()
        pos[:, -1] = False
        pos, targets = pos[:, :-1], ids[:, 1:]
        clean_logp = F.log_softmax(clean[:, :-1].float(), dim=-1)

        def nll(logp):
            return float((-logp.gather(-1, targets[..., None]).squeeze(-1))[pos].double().sum())

        for name, (sae, reads, write) in bound.items():
            x = captured[write][keep].float()
            f = sae.encode(captured[reads][keep].float())
            recon[name].update(x, sae.decode(f), f)
            stats = down[name]
            stats.sum_ce["clean"] += nll(clean_logp)
            stats.n += int(pos.sum())
            for mode in DownstreamStats.MODES:
                if mode == "sae" and reads != write:
                    fn = replace_at(keep, sae.decode(f))
                else:
                    fn = splice(sae, keep, mode, means[write])
                with lm.edit({write: fn}):
                    logp = F.log_softmax(lm.logits(ids)[:, :-1].float(), dim=-1)
                stats.sum_ce[mode] += nll(logp)
                kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)
                stats.sum_kl[mode] += float(kl[pos].double().sum())
    return {n: {**recon[n].result(), **down[n].result()} for n in bound}


@pytest.mark.parametrize("cache_bytes", [1 << 30, 0])
def test_the_fast_path_gives_the_figures_of_full_forwards(tiny_llama, tiny_llama_dir, text_file, tmp_path,
                                                          monkeypatch, cache_bytes):
    """SAEs and transcoders at several sites (first edited blocks 1, 2 and 3; one site read before the first of
    them; two SAEs sharing a site): every figure equals the full-forward evaluation's exactly, with the first pass's
    reads kept (cache_bytes 1 GiB) or read again (0)."""
    import saeforge.evals.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "PREFIX_CACHE_BYTES", cache_bytes)
    layout = {"a": ("layers.1.resid_post", "layers.1.resid_post"), "b": ("layers.1.resid_post", "layers.1.resid_post"),
              "mlp": ("layers.1.mlp_out", "layers.1.mlp_out"), "tc": ("layers.0.resid_post", "layers.2.mlp_out"),
              "early": ("layers.0.mlp_out", "layers.2.resid_post")}
    run = tmp_path / "run"
    saes = {}
    for i, (name, (reads, writes)) in enumerate(layout.items()):
        saes[name] = _random(seed=i, k=6)
        save_sae(saes[name], run / "saes" / name, metadata=_binding_meta(tiny_llama_dir, reads, writes))
    report = evaluate(_cfg(run, text_file, plots=False, tokens=32 * 10))  # batches of 4, 4 and 2 contexts

    from saeforge.runs import load_run

    loaded = load_run(run, lm=tiny_llama)  # the SAEs as saved (the weights evaluate() used)
    ts = TokenStream.for_model(TextSource(str(text_file)), tiny_llama, TokenPolicy(context_length=32))
    batches = [ids for _, ids in zip(range(3), (b for _, b in ts.batches(4)))]
    batches[-1] = batches[-1][:2]
    keeps = [ts.keep_mask(ids) for ids in batches]
    with torch.inference_mode():
        expected = _reference_eval(tiny_llama, {n: (loaded.saes[n].sae, *layout[n]) for n in layout}, batches, keeps)
    for name, want in expected.items():
        got = report["saes"][name]
        assert got["reads"] == layout[name][0] and got["writes"] == layout[name][1]
        assert got["kind"] == ("sae" if layout[name][0] == layout[name][1] else "transcoder")
        for key, value in want.items():
            assert got[key] == value or (value != value and got[key] != got[key]), (name, key, got[key], value)
    assert report["n_token_positions"] == 10 * 32


def test_site_override_for_an_sae_from_elsewhere(tiny_llama_dir, text_file, tmp_path, capsys):
    from saeforge.cli import main
    from saeforge.formats import save_as

    folder = save_as(_identity_sae(32), tmp_path / "lens", "saelens",
                     metadata={"hook_name": "blocks.1.hook_resid_post", "model_name": str(tiny_llama_dir)})
    with pytest.raises(SaeforgeError, match="blocks.1.hook_resid_post"):
        evaluate(_cfg(folder, text_file, plots=False))
    code = main(["eval", str(folder), "--site", SITE, "--corpus", str(text_file), "--tokens", "256",
                 "--context-length", "32", "--device", "cpu", "--noplots", "--noprogress"])
    out = capsys.readouterr().out
    assert code in (0, None), out
    row = next(line for line in out.splitlines() if line.startswith("lens"))
    assert row.split()[1:3] == [SITE, SITE]
    m = json.loads((folder / "eval.json").read_text())["saes"]["lens"]
    assert m["kind"] == "sae" and m["fvu"] == 0.0 and m["ce_recovered"] == 1.0


def test_dictionaries_eval_cannot_replace_are_refused(tiny_llama_dir, text_file, tmp_path):
    from saeforge.runs import SiteBinding

    meta = {"model_name": str(tiny_llama_dir), "context_size": 32}
    save_sae(_random(), tmp_path / "backwards",
             metadata={**SiteBinding.single("layers.2.resid_post", "layers.1.mlp_out").to_metadata(), **meta})
    with pytest.raises(SaeforgeError, match="would read layers.2.resid_post and write layers.1.mlp_out, which the "
                                            "model computes before"):
        evaluate(_cfg(tmp_path / "backwards", text_file))
    # one site read, two written: no layer-by-layer replacement exists
    save_sae(_random(d_out=64), tmp_path / "fan", metadata={"reads": ["layers.0.mlp_in"],
                                                          "writes": ["layers.0.mlp_out", "layers.1.mlp_out"], **meta})
    with pytest.raises(SaeforgeError, match="TopKSAE bound as a cross-layer transcoder .* has no encode_layer"):
        evaluate(_cfg(tmp_path / "fan", text_file))
    # a two-model crosscoder is refused before any model is loaded (the model name is not even a model)
    pair = ["a--layers.1.resid_post", "b--layers.1.resid_post"]
    save_sae(_random(d_out=64), tmp_path / "two",
             metadata={"reads": pair, "writes": pair, "model_name": "no/such-model"})
    with pytest.raises(SaeforgeError, match="two is a crosscoder over 2 models") as err:
        evaluate(_cfg(tmp_path / "two", text_file))
    assert "saeforge diff" in err.value.fix


def test_logit_reference_reproduces_the_plain_formulas_bit_for_bit():
    """Reused buffers (a smaller batch after a larger one, a vocabulary that is no multiple of a vector width) give
    exactly the values of log_softmax on the sliced logits and KL = Σ p (log p − log q)."""
    import torch.nn.functional as F

    from saeforge.evals.downstream import LogitReference

    g = torch.Generator().manual_seed(0)
    buffers = {}
    for batch in (5, 3):
        ids = torch.randint(0, 997, (batch, 9), generator=g)
        keep = torch.rand(batch, 9, generator=g) > 0.2
        clean, other = (torch.randn(batch, 9, 997, generator=g) * 3 for _ in range(2))
        ref = LogitReference(ids, keep, clean, buffers)
        pos = keep.clone()
        pos[:, -1] = False
        pos = pos[:, :-1]
        cl, lo = F.log_softmax(clean[:, :-1], -1), F.log_softmax(other[:, :-1], -1)

        def nll(logp):
            return float((-logp.gather(-1, ids[:, 1:, None]).squeeze(-1))[pos].double().sum())

        assert ref.n == int(pos.sum()) and ref.nll == nll(cl)
        kl = float((cl.exp() * (cl - lo)).sum(-1)[pos].double().sum())
        assert ref.measure(other) == (nll(lo), kl)
        assert ref.measure(clean) == (nll(cl), 0.0)
    assert buffers["full"].shape == (5, 9, 997)  # allocated once, for the larger batch
    with pytest.raises(SaeforgeError, match="measured against a clean batch of shape"):
        ref.measure(torch.zeros(3, 8, 997))


def test_a_trained_run_of_every_kind_is_evaluated(mlp_cache, tiny_llama, text_file, tmp_path):
    """What `saeforge train` writes (per-site scales folded, the binding in the metadata) is what eval replaces: a
    CLT, three per-layer transcoders and a crosscoder from one run, each with the figures of its kind."""
    from saeforge.training import train
    from tests.training.test_trainer import CLT_AND_TRANSCODERS, _multi_config

    train(_multi_config(tmp_path, mlp_cache, CLT_AND_TRANSCODERS), given=["config", "out"])
    report = evaluate(_cfg(tmp_path / "run", text_file, plots=False))
    saes = report["saes"]
    assert {n: m["kind"] for n, m in saes.items()} == {"clt": "clt", "xc": "crosscoder",
                                                      **{f"layers.{i}.mlp_in": "transcoder" for i in range(3)}}
    clt = saes["clt"]
    assert (clt["reads"], clt["writes"]) == ("layers.0-2.mlp_in", "layers.0-2.mlp_out")
    assert set(clt["sites"]) == {f"layers.{i}.mlp_out" for i in range(3)}
    assert all(0 < s["fvu"] < 1 and 0 < s["l0"] <= 4 for s in clt["sites"].values())  # k = 4 per layer
    assert set(saes["xc"]["per_site"]) == {f"layers.{i}.mlp_in" for i in range(3)} and "sites" in saes["xc"]
    # the per-layer transcoder of layer 1 and the CLT's layer 1 replace the same site: the same clean figures
    assert saes["layers.1.mlp_in"]["ce_loss_clean"] == clt["ce_loss_clean"]
    for m in saes.values():
        assert m["ce_loss_zero_ablation"] > 0 and m["kl_div"] >= 0 and m["n_loss_positions"] > 0
