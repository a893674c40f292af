import copy
import math

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.interventions.generate import run_steering
from saeforge.interventions.steering import FeatureEdit, Steerer, parse_feature
from saeforge.runs import BoundSAE

SITE = "layers.1.resid_post"
PROMPTS = ["To be, or not to be", "Now is the winter of"]


@pytest.fixture(scope="module")
def steerer(tiny_run, tiny_llama):
    return Steerer.from_run(tiny_run, lm=tiny_llama)


def _edited(steerer, edits, text="To be, or not to be, that is the question"):
    """(x before, x after) at the site for one prompt, with the edits in force."""
    lm = steerer.lm
    ids = torch.tensor([[lm.bos_token_id()] + lm.tokenizer(text, add_special_tokens=False)["input_ids"]])
    before = lm.read(ids, [SITE])[SITE][0]
    with steerer.steering(edits):
        after = lm.read(ids, [SITE])[SITE][0]
    return before, after


def test_add_clamp_and_scale_follow_their_formulas(steerer):
    sae = steerer.saes[SITE][0]
    d = sae.W_dec[5].detach()
    x, y = _edited(steerer, [FeatureEdit(SITE, 5, "add", 2.5, "raw")])
    assert torch.equal(y[0], x[0])  # BOS is not SAE data and is never edited
    torch.testing.assert_close(y[1:], x[1:] + 2.5 * d)
    x, y = _edited(steerer, [FeatureEdit(SITE, 5, "clamp", 3.0, "raw")])
    f5 = sae.encode(x[1:])[:, 5]
    torch.testing.assert_close(y[1:], x[1:] + (3.0 - f5)[:, None] * d)
    x, y = _edited(steerer, [FeatureEdit(SITE, 5, "scale", 0.0)])  # ablation
    f5 = sae.encode(x[1:])[:, 5]
    torch.testing.assert_close(y[1:], x[1:] - f5[:, None] * d)


def test_max_units_use_the_feature_statistics(steerer):
    m = steerer.max_acts[SITE]
    assert m is not None and m.shape == (128,)
    idx = int(m.argmax())
    assert steerer.value(FeatureEdit(SITE, idx, "add", 2.0)) == pytest.approx(2.0 * float(m[idx]))


def test_zero_strength_leaves_generation_unchanged_and_same_seed_is_used(steerer):
    run = run_steering(steerer, PROMPTS, [FeatureEdit(SITE, 3, "add", 0.0, "raw")], max_new_tokens=8, seed=3)
    assert run.baseline == run.steered and run.metrics["kl_prompt"] == 0.0
    assert run.metrics["perplexity_baseline"] == run.metrics["perplexity_steered"]


def _plain_mean(steerer, prompts, new_texts_ids, feature, n_prompt, ids, mask):
    lm = steerer.lm
    full = torch.cat([ids, new_texts_ids], 1)
    x = lm.read(full, [SITE], attention_mask=torch.cat([mask, torch.ones_like(new_texts_ids)], 1))[SITE]
    with torch.no_grad():
        return float(steerer.saes[SITE][0].encode(x[:, n_prompt:])[..., feature].mean())


def test_the_effect_is_read_by_the_plain_model_and_the_injection_apart(steerer):
    from saeforge.interventions.generate import Continuations

    run = run_steering(steerer, PROMPTS, [FeatureEdit(SITE, 9, "clamp", 25.0, "raw")], max_new_tokens=8, seed=1)
    e = run.metrics["edits"][0]
    assert e["target_activation_injected"] > e["target_activation_baseline"] + 5  # clamped to 25 where it is set
    # the plain-model reading, recomputed independently from the generated text
    gen = Continuations(steerer, PROMPTS, max_new_tokens=8, seed=1)
    with steerer.steering([FeatureEdit(SITE, 9, "clamp", 25.0, "raw")]):
        new = gen.sample()
    assert gen.decode(new) == run.steered
    plain = _plain_mean(steerer, PROMPTS, new, 9, gen.n_prompt, gen.ids, gen.mask)
    assert e["target_activation_steered"] == pytest.approx(plain, rel=1e-5, abs=1e-6)
    assert e["target_activation_steered"] < e["target_activation_injected"] - 5
    assert run.metrics["kl_prompt"] > 0
    assert all(math.isfinite(p) and p > 1 for p in run.metrics["perplexity_steered"])
    assert e["read_site"] == e["write_site"] == SITE


def test_an_injection_that_leaves_the_text_alone_reads_no_change(steerer):
    """The old bug: reading the target feature with the edit in force measures the injection. Feature 5 is rebuilt
    to read a direction u in which the text's activations do not vary (so it is 0 on the plain text) and to write
    1e-4·u (so adding it cannot change a greedy continuation), with an encoder steep enough that the injection
    alone lifts it to ~10."""
    from saeforge.interventions.generate import Continuations

    lm = steerer.lm
    gen = Continuations(steerer, PROMPTS, max_new_tokens=8, temperature=0.0)
    new = gen.sample()
    full = torch.cat([gen.ids, new], 1)
    x = lm.read(full, [SITE], attention_mask=torch.cat([gen.mask, torch.ones_like(new)], 1))[SITE]
    x = x[torch.cat([gen.keep, torch.ones_like(new, dtype=torch.bool)], 1)]
    u = torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh[-1]  # fewer tokens than dimensions: no variance
    assert float((x @ u).std()) < 1e-5
    sae = copy.deepcopy(steerer.saes[SITE][0])
    eps, steep = 1e-4, 1e5
    with torch.no_grad():
        sae.W_dec[5] = eps * u
        sae.W_enc[:, 5] = steep * u
        x_in = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x  # what the encoder multiplies
        sae.b_enc[5] = -steep * float((x_in @ u).mean())
    injecting = Steerer(lm, {SITE: (sae, steerer.saes[SITE][1])}, {SITE: None}, steerer.policy)
    run = run_steering(injecting, PROMPTS, [FeatureEdit(SITE, 5, "add", 1.0, "raw")], max_new_tokens=8,
                       temperature=0.0)
    e = run.metrics["edits"][0]
    assert run.steered == run.baseline  # the text did not change ...
    assert e["target_activation_steered"] == e["target_activation_baseline"]  # ... so the plain model reads none
    assert abs(e["target_activation_baseline"]) < 0.05
    assert e["target_activation_injected"] > 5  # the old reading: the injection itself
    assert run.metrics["theme_rate_steered"] == run.metrics["theme_rate_baseline"]


def test_generated_only_positions_leave_the_prompt_alone(steerer):
    run = run_steering(steerer, PROMPTS, [FeatureEdit(SITE, 9, "add", 50.0, "raw")], positions="generated",
                       max_new_tokens=6, seed=0)
    assert run.metrics["kl_prompt"] == 0.0


@pytest.mark.parametrize("edit, message", [
    (FeatureEdit(SITE, 128, "add", 1.0), "feature 128 is out of range"),
    (FeatureEdit(SITE, 1, "add", float("nan")), "strength nan is not allowed"),
    (FeatureEdit(SITE, 1, "add", 5000.0), r"\|strength\| ≤ 1000"),
    (FeatureEdit(SITE, 1, "boost", 1.0), "unknown steering mode"),
    (FeatureEdit("layers.0.mlp_out", 1, "add", 1.0), "no SAE 'layers.0.mlp_out' in this run"),
])
def test_bad_edits_are_refused(steerer, edit, message):
    with pytest.raises(SaeforgeError, match=message):
        run_steering(steerer, PROMPTS, [edit], max_new_tokens=2)


def test_bad_feature_specs_and_prompts(steerer):
    with pytest.raises(SaeforgeError, match="not SITE:INDEX"):
        parse_feature("layers.1.resid_post", [SITE])
    with pytest.raises(SaeforgeError, match="no SAE 'layers.9.resid_post'"):
        parse_feature("layers.9.resid_post:3", [SITE])
    with pytest.raises(SaeforgeError, match="the prompt has .* tokens; with 4 new tokens"):
        run_steering(steerer, ["word " * 400], [FeatureEdit(SITE, 1, "add", 1.0, "raw")], max_new_tokens=4)


# ------------------------------------------------------------------------------------------------- the norm unit
def test_norm_unit_is_relative_to_the_mean_norm_at_the_write_site(steerer, tiny_cache):
    meta = steerer.bound[SITE].meta
    assert meta["normalization"]["method"] == "expected_norm"
    value, source = steerer.mean_norm(SITE)
    assert value == pytest.approx(math.sqrt(32) / meta["normalization"]["scale_in"], rel=1e-12)
    assert source == "the SAE's training data"
    # the scale was estimated on a sample of the training cache: its mean norm agrees with the whole cache's
    assert value == pytest.approx(tiny_cache.manifest["mean_norm"][SITE], rel=0.03)
    d = steerer.saes[SITE][0].W_dec[5].detach()
    assert steerer.value(FeatureEdit(SITE, 5, "add", 0.5, "norm")) == pytest.approx(0.5 * value / float(d.norm()))
    x, y = _edited(steerer, [FeatureEdit(SITE, 5, "add", 0.5, "norm")])
    torch.testing.assert_close((y[1:] - x[1:]).norm(dim=-1), torch.full((x.shape[0] - 1,), 0.5 * value))
    with pytest.raises(SaeforgeError, match=r"\|strength\| ≤ 100 \(unit norm\)"):
        steerer.check([FeatureEdit(SITE, 5, "add", 101.0, "norm")])


def test_norm_unit_without_a_recorded_norm_is_measured(steerer, text_file):
    lm = steerer.lm
    sae, site = steerer.saes[SITE]
    on_corpus = Steerer(lm, {"s": BoundSAE("s", sae, (site,), (site,), meta={"dataset_path": str(text_file)})},
                        {"s": None}, steerer.policy)
    value, source = on_corpus.mean_norm("s")
    assert source.endswith(f"tokens of 1 texts of {text_file}")
    # independently: the file's first 2000 characters, BOS first, cut at the run's context length, BOS not counted
    ids = lm.tokenizer(text_file.read_text()[:2000], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[lm.bos_token_id()] + ids][:1])[:, : steerer.policy.context_length]
    x = lm.read(ids, [SITE])[SITE][0, 1:]
    assert value == pytest.approx(float(x.norm(dim=-1).mean()), rel=1e-5)
    bare = Steerer(lm, {"s": BoundSAE("s", sae, (site,), (site,), meta={})}, {"s": None}, steerer.policy)
    value, source = bare.mean_norm("s")
    assert "neutral prompts" in source and value > 0
    scaled = BoundSAE("t", sae, (site,), (site,), meta={"normalization": {"method": "expected_norm",
                                                                           "scale_in": 2.0, "scale_out": 4.0}})
    assert Steerer(lm, {"t": scaled}, {"t": None}).mean_norm("t")[0] == pytest.approx(math.sqrt(32) / 4.0)


# ------------------------------------------------------------------------------------------------- transcoders
READS, WRITES = "layers.0.resid_post", "layers.1.mlp_out"


@pytest.fixture(scope="module")
def transcoder(tiny_llama):
    from saeforge.runs import SiteBinding, bind
    from saeforge.saes import TopKConfig, make_sae

    torch.manual_seed(0)
    sae = make_sae(TopKConfig(d_in=32, d_sae=16, k=4, d_out=32, apply_b_dec_to_input=False)).eval()
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # most latents fire, so clamp and scale have something to act on
    return bind("tc", sae, SiteBinding.single(READS, WRITES), tiny_llama)


def _encode(sae, x):
    with torch.no_grad():
        return sae.encode(x)


def _ids(lm, text="To be, or not to be, that is the question"):
    return torch.tensor([[lm.bos_token_id()] + lm.tokenizer(text, add_special_tokens=False)["input_ids"]])


@pytest.mark.parametrize("mode, strength", [("add", 2.5), ("clamp", 3.0), ("scale", 0.0), ("scale", 2.0)])
def test_a_transcoder_steers_where_it_writes_with_f_from_where_it_reads(tiny_llama, transcoder, mode, strength):
    lm, sae = tiny_llama, transcoder.sae
    st = Steerer(lm, {"tc": transcoder}, {"tc": None})
    ids = _ids(lm)
    plain = lm.read(ids, [READS, WRITES])
    with st.steering([FeatureEdit("tc", 3, mode, strength, "raw")]):
        got = lm.read(ids, [READS, WRITES])
    assert torch.equal(got[READS], plain[READS])  # nothing is written where the transcoder reads
    d = sae.W_dec[3].detach()
    f = _encode(sae, plain[READS][0])[:, 3]  # from the activation at A, not from x_B
    assert bool((f[1:] > 0).any())
    delta = {"add": torch.full_like(f, strength), "clamp": strength - f, "scale": (strength - 1) * f}[mode]
    expected = plain[WRITES][0, 1:] + delta[1:, None] * d
    torch.testing.assert_close(got[WRITES][0, 1:], expected)
    assert torch.equal(got[WRITES][0, 0], plain[WRITES][0, 0])  # BOS untouched


def test_a_transcoder_reads_an_activation_edited_upstream(tiny_llama, transcoder, steerer):
    """An SAE edit at A and a transcoder clamp at B in one block: f is encoded from A after A's edit."""
    lm, sae = tiny_llama, transcoder.sae
    site_a = lm.site(READS)
    other = make_sae_at(32, 1)
    st = Steerer(lm, {"tc": transcoder, "a": BoundSAE("a", other, (site_a,), (site_a,))}, {"tc": None, "a": None})
    ids = _ids(lm)
    first = [FeatureEdit("a", 0, "add", 4.0, "raw")]
    with st.steering(first):
        ref = lm.read(ids, [READS, WRITES])
    with st.steering(first + [FeatureEdit("tc", 3, "clamp", 3.0, "raw")]):
        got = lm.read(ids, [READS, WRITES])
    f = _encode(sae, ref[READS][0])[:, 3]
    torch.testing.assert_close(got[WRITES][0, 1:], ref[WRITES][0, 1:] + (3.0 - f[1:])[:, None] * sae.W_dec[3].detach())


def make_sae_at(d, seed):
    from saeforge.saes import TopKConfig, make_sae

    torch.manual_seed(seed)
    return make_sae(TopKConfig(d_in=d, d_sae=8, k=2)).eval()


def test_a_transcoder_that_writes_before_it_reads_is_refused(tiny_llama):
    from saeforge.runs import SiteBinding, bind

    backwards = bind("back", make_sae_at(32, 2), SiteBinding.single("layers.2.resid_post", "layers.0.mlp_out"),
                     tiny_llama)
    st = Steerer(tiny_llama, {"back": backwards}, {"back": None})
    with st.steering([FeatureEdit("back", 1, "clamp", 1.0, "raw")]), \
            pytest.raises(SaeforgeError, match="before the site it reads"):
        tiny_llama.logits(_ids(tiny_llama))
    with st.steering([FeatureEdit("back", 1, "add", 1.0, "raw")]):  # add needs no f: allowed
        tiny_llama.logits(_ids(tiny_llama))


def test_run_steering_measures_a_transcoder_at_its_read_site(tiny_llama, transcoder):
    st = Steerer(tiny_llama, {"tc": transcoder}, {"tc": None})
    run = run_steering(st, PROMPTS, [FeatureEdit("tc", 3, "clamp", 0.0, "raw")], max_new_tokens=4, seed=0)
    e = run.metrics["edits"][0]
    assert (e["read_site"], e["write_site"]) == (READS, WRITES)
    # clamping at B leaves A at the same position alone: with the text unchanged the injected reading is the plain one
    if run.steered == run.baseline:
        assert e["target_activation_injected"] == pytest.approx(e["target_activation_baseline"], rel=1e-5)
    assert e["target_activation_baseline"] > 0


# ------------------------------------------------------------------------- dictionaries writing several sites
MLP_IN = tuple(f"layers.{i}.mlp_in" for i in range(3))
MLP_OUT = tuple(f"layers.{i}.mlp_out" for i in range(3))
RESID = tuple(f"layers.{i}.resid_post" for i in range(3))
F_CLT = 16  # features per layer


@pytest.fixture(scope="module")
def clt(tiny_llama):
    from saeforge.runs import SiteBinding, bind
    from saeforge.saes import TopKCLTConfig, make_sae

    torch.manual_seed(4)
    sae = make_sae(TopKCLTConfig(d_in=3 * 32, d_sae=3 * F_CLT, d_out=3 * 32, n_layers=3, k=6)).eval()
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # most latents fire, so clamp and scale have something to act on
    return bind("clt", sae, SiteBinding(MLP_IN, MLP_OUT), tiny_llama)


@pytest.fixture(scope="module")
def crosscoder(tiny_llama):
    from saeforge.runs import SiteBinding, bind
    from saeforge.saes import TopKCrosscoderConfig, make_sae

    torch.manual_seed(5)
    sae = make_sae(TopKCrosscoderConfig(d_in=3 * 32, d_sae=24, n_sites=3, k=4)).eval()
    return bind("xc", sae, SiteBinding(RESID, RESID), tiny_llama)


def _by_hand(lm, ids, deltas: dict):
    """Activations at every MLP and residual site with ``deltas[site]`` ([T, d], BOS row zero) added by plain
    ``lm.edit`` hooks: the edit steering should make, written independently of it."""
    fns = {site: (lambda x, d=d: x + d.to(x)[None]) for site, d in deltas.items()}
    with lm.edit(fns):
        return lm.read(ids, list(MLP_IN + MLP_OUT + RESID))


@pytest.mark.parametrize("mode, strength", [("add", 2.5), ("clamp", 3.0), ("scale", 0.0), ("scale", 2.0)])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_a_clt_feature_steers_every_mlp_output_it_writes_with_its_own_row(tiny_llama, clt, mode, strength, layer):
    """A feature of layer l writes the MLP outputs of layers l..2, each with its block W_dec[l][i, j - l]; clamp and
    scale take f_i from layer l's MLP input in the same forward (encode_layer) and move every row together."""
    lm, sae = tiny_llama, clt.sae
    column = 5
    feature = layer * F_CLT + column
    ids = _ids(lm)
    plain = lm.read(ids, list(MLP_IN))
    f = _encode_layer(sae, layer, plain[MLP_IN[layer]][0])[:, column]  # layer l's input: upstream of every edit
    assert bool((f[1:] > 0).any())
    delta = {"add": torch.full_like(f, strength), "clamp": strength - f, "scale": (strength - 1) * f}[mode]
    delta[0] = 0  # BOS is never edited
    rows = {MLP_OUT[j]: sae.W_dec[layer][column, j - layer].detach() for j in range(layer, 3)}
    assert list(clt.written_rows(feature)) == list(MLP_OUT[layer:])
    expected = _by_hand(lm, ids, {site: delta[:, None] * row for site, row in rows.items()})
    st = Steerer(lm, {"clt": clt}, {"clt": None})
    with st.steering([FeatureEdit("clt", feature, mode, strength, "raw")]):
        got = lm.read(ids, list(MLP_IN + MLP_OUT + RESID))
    unedited = lm.read(ids, list(MLP_OUT))
    for site in MLP_IN + MLP_OUT + RESID:
        torch.testing.assert_close(got[site], expected[site], rtol=1e-5, atol=1e-5, msg=site)
    for j in range(3):  # nothing before the feature's layer moves; every layer it writes does
        moved = not torch.equal(got[MLP_OUT[j]], unedited[MLP_OUT[j]])
        assert moved == (j >= layer and not (mode == "scale" and strength == 1)), MLP_OUT[j]


def _encode_layer(sae, layer, x):
    with torch.no_grad():
        return sae.encode_layer(layer, x)


def test_clt_norm_units_cover_the_sites_a_feature_writes(tiny_llama, clt):
    """S in norm units: c·‖d_i‖ = S·√(Σ_s mean‖x_s‖²), both over the sites the feature writes (here layers 1 and 2
    for a layer-1 feature), the mean norms from the saved per-site normalisation."""
    scales = [0.5, 2.0, 4.0]
    bound = BoundSAE("clt", clt.sae, clt.reads, clt.writes,
                     meta={"normalization": {"method": "expected_norm", "scale_in": [1.0] * 3, "scale_out": scales}})
    st = Steerer(tiny_llama, {"clt": bound}, {"clt": None})
    feature = F_CLT + 7
    norms = [math.sqrt(32) / s for s in scales]
    assert st.mean_norm("clt", feature)[0] == pytest.approx(math.hypot(norms[1], norms[2]))
    assert st.mean_norm("clt", 7)[0] == pytest.approx(math.sqrt(sum(n * n for n in norms)))
    d_norm = float(torch.cat([clt.sae.W_dec[1][7, 0], clt.sae.W_dec[1][7, 1]]).norm())
    assert st.value(FeatureEdit("clt", feature, "add", 0.5, "norm")) == pytest.approx(
        0.5 * math.hypot(norms[1], norms[2]) / d_norm)


@pytest.mark.parametrize("feature", [0, 11, 23])
def test_a_crosscoder_feature_adds_its_slice_at_every_site(tiny_llama, crosscoder, feature):
    lm, sae = tiny_llama, crosscoder.sae
    ids = _ids(lm)
    row = sae.W_dec[feature].detach()
    mask = torch.ones(ids.shape[1], 1)
    mask[0] = 0
    expected = _by_hand(lm, ids, {RESID[s]: 1.5 * mask * row[s * 32:(s + 1) * 32] for s in range(3)})
    st = Steerer(lm, {"xc": crosscoder}, {"xc": None})
    with st.steering([FeatureEdit("xc", feature, "add", 1.5, "raw")]):
        got = lm.read(ids, list(MLP_IN + MLP_OUT + RESID))
    for site in RESID + MLP_OUT:
        torch.testing.assert_close(got[site], expected[site], rtol=1e-5, atol=1e-5, msg=site)
    assert not torch.equal(got[RESID[0]], lm.read(ids, [RESID[0]])[RESID[0]])


@pytest.mark.parametrize("mode", ["clamp", "scale"])
def test_a_crosscoder_refuses_clamp_and_scale_naming_why(tiny_llama, crosscoder, mode):
    st = Steerer(tiny_llama, {"xc": crosscoder}, {"xc": None})
    with pytest.raises(SaeforgeError, match=r"xc is a crosscoder: its latents read all its sites \(layers.0.resid_post"
                       r", layers.1.resid_post, layers.2.resid_post\)") as err:
        st.check([FeatureEdit("xc", 3, mode, 2.0, "raw")])
    assert "--mode add" in err.value.fix


def test_a_run_with_a_clt_steers_it_beside_its_other_dictionaries(tiny_llama, steerer, clt):
    """A CLT clamp and an SAE edit in one block: each acts where it writes; run_steering measures the CLT feature
    from its reads and reports the sites it wrote."""
    st = Steerer(tiny_llama, {"clt": clt, SITE: steerer.bound[SITE]}, {"clt": None, SITE: None})
    assert st.saes["clt"][1] is None and st.saes[SITE][1].name == SITE
    before, after = _edited(st, [FeatureEdit(SITE, 3, "add", 2.0, "raw")])
    assert not torch.equal(before[1:], after[1:])
    run = run_steering(st, PROMPTS, [FeatureEdit("clt", F_CLT + 2, "clamp", 0.0, "raw")], max_new_tokens=4, seed=0)
    e = run.metrics["edits"][0]
    assert (e["read_site"], e["write_site"]) == ("layers.0-2.mlp_in", "layers.1,2.mlp_out")
    assert e["target_activation_baseline"] > 0
