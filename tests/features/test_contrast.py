import numpy as np
import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.features.contrast import ContrastConfig, benjamini_hochberg, contrast, mann_whitney
from saeforge.saes import TopKConfig, make_sae, save_sae

SITE = "layers.0.resid_pre"  # the token embedding itself in a Llama: a latent can be made to detect one token


def test_mann_whitney_auroc_and_p_values():
    rng = np.random.default_rng(0)
    pos = np.concatenate([rng.normal(1.0, 1, (400, 1)), rng.normal(0, 1, (400, 1)), np.zeros((400, 1))], 1)
    neg = np.concatenate([rng.normal(0.0, 1, (300, 1)), rng.normal(0, 1, (300, 1)), np.zeros((300, 1))], 1)
    auroc, p = mann_whitney(pos, neg)
    # the exact AUROC by counting pairs (ties ½)
    for j in range(3):
        diff = pos[:, j][:, None] - neg[:, j][None, :]
        assert auroc[j] == pytest.approx(((diff > 0) + 0.5 * (diff == 0)).mean(), abs=1e-12)
    assert auroc[0] > 0.7 and p[0] < 1e-20  # shifted by one standard deviation: clearly separated
    assert 0.01 < p[1] < 0.99 and p[2] == 1.0  # same distribution; all tied (never fires)


def test_benjamini_hochberg_matches_the_definition():
    p = np.array([0.01, 0.04, 0.03, 0.5, 0.001])
    q = benjamini_hochberg(p)
    # sorted p: .001 .01 .03 .04 .5 → p*m/rank: .005 .025 .05 .05 .5, then running minimum from the top
    assert q.tolist() == pytest.approx([0.025, 0.05, 0.05, 0.5, 0.005])


def _marker_texts():
    """make(with_marker): 12 random words of a line of Shakespeare, with " their" in the middle or not."""
    words = "the sea of troubles and by opposing end them now is the winter of our discontent".split()
    rng = np.random.default_rng(1)
    return lambda with_marker: " ".join(
        list(rng.choice(words, 8)) + (["their"] if with_marker else []) + list(rng.choice(words, 4)))


def test_finds_the_feature_of_a_marker_word(tiny_llama, tiny_llama_dir, tmp_path):
    tok = tiny_llama.tokenizer
    marker = tok(" their", add_special_tokens=False)["input_ids"]
    assert len(marker) == 1
    emb = tiny_llama.model.get_input_embeddings().weight.detach()
    torch.manual_seed(0)
    sae = make_sae(TopKConfig(d_in=32, d_sae=64, k=6, apply_b_dec_to_input=False))
    with torch.no_grad():
        e = emb[marker[0]]
        sae.W_enc[:, 7] = e / e.norm() * 3  # latent 7 fires strongly on the marker token only
        sae.b_enc[7] = -float((emb @ (e / e.norm() * 3)).sort().values[-2]) - 1e-3
    save_sae(sae, tmp_path / "sae", metadata={"hook_name": SITE, "model_name": str(tiny_llama_dir),
                                              "context_size": 32})
    make = _marker_texts()
    (tmp_path / "pos.txt").write_text("\n".join(make(True) for _ in range(40)))
    (tmp_path / "neg.txt").write_text("\n".join(make(False) for _ in range(40)))
    report = contrast(ContrastConfig(path=str(tmp_path / "sae"), positive=str(tmp_path / "pos.txt"),
                                     negative=str(tmp_path / "neg.txt"), top=5, device="cpu"))
    r = report["saes"]["sae"]
    best = r["features"][0]
    assert best["feature"] == 7 and best["auroc"] == 1.0 and best["significant"]
    assert best["freq_pos"] == 1.0 and best["freq_neg"] == 0.0 and best["ratio"] is None
    assert best["examples"][0]["tokens"][int(np.argmax(best["examples"][0]["acts"]))] == " their"
    assert (tmp_path / "sae" / "contrast.json").is_file()
    # Two samples of the same distribution: under the null the FDR cut-off should report nothing.
    (tmp_path / "neg2.txt").write_text("\n".join(make(False) for _ in range(40)))
    null = contrast(ContrastConfig(path=str(tmp_path / "sae"), positive=str(tmp_path / "neg.txt"),
                                   negative=str(tmp_path / "neg2.txt"), top=5, device="cpu"))
    assert null["saes"]["sae"]["n_significant"] == 0


def test_bad_inputs(tmp_path):
    (tmp_path / "one.txt").write_text("only one text\n")
    with pytest.raises(SaeforgeError, match="holds 1 text"):
        contrast(ContrastConfig(path=str(tmp_path), positive=str(tmp_path / "one.txt"),
                                negative=str(tmp_path / "one.txt")))
    with pytest.raises(SaeforgeError, match="give both --positive and --negative"):
        contrast(ContrastConfig(path=str(tmp_path), positive=str(tmp_path / "one.txt")))


def test_output_effect_ranking_and_columns(tiny_llama, tiny_llama_dir, tmp_path):
    from saeforge.features.contrast import theme_words_from_texts
    from saeforge.interventions.selection import LogitLens

    tok = tiny_llama.tokenizer
    their = tok(" their", add_special_tokens=False)["input_ids"][0]
    lens = LogitLens(tiny_llama)
    # the direction with the largest standardised direct effect on ' their': Σ⁻¹(m_t − μ) (a Rayleigh quotient)
    best = torch.linalg.solve(lens.cov + 1e-6 * torch.eye(32), lens.M[:, their] - lens.mean)
    torch.manual_seed(0)
    sae = make_sae(TopKConfig(d_in=32, d_sae=64, k=6, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_dec[11] = best / best.norm() * 0.7
    save_sae(sae, tmp_path / "sae", metadata={"hook_name": SITE, "model_name": str(tiny_llama_dir),
                                              "context_size": 32})
    make = _marker_texts()
    pos_texts, neg_texts = [make(True) for _ in range(30)], [make(False) for _ in range(30)]
    (tmp_path / "pos.txt").write_text("\n".join(pos_texts))
    (tmp_path / "neg.txt").write_text("\n".join(neg_texts))
    assert theme_words_from_texts(pos_texts, neg_texts) == ["their"]  # every positive, no negative
    common = dict(path=str(tmp_path / "sae"), positive=str(tmp_path / "pos.txt"), negative=str(tmp_path / "neg.txt"),
                  top=5, device="cpu", effect="direct")
    # the tiny vocabulary is mostly single bytes, so the writer of ' their' promotes junk around it: dropped ...
    strict = contrast(ContrastConfig(rank_by="output-effect", **common))["saes"]["sae"]
    assert 11 in strict["rejected_as_junk"] and all(r["feature"] != 11 for r in strict["features"])
    assert all(not r["junk"] for r in strict["features"])
    # ... unless the junk rule is relaxed, and then it is the first by output effect (without --theme-words: the
    # word that marks the positives)
    loose = contrast(ContrastConfig(rank_by="output-effect", min_word_fraction=0.05, **common))
    rows = loose["saes"]["sae"]["features"]
    assert loose["theme_words"] == ["their"] and rows[0]["feature"] == 11
    assert rows[0]["promoted"][0][0] == " their"
    effects = [r["output_effect"] for r in rows]
    assert effects == sorted(effects, reverse=True) and len(rows) == 5
    # the AUROC ranking keeps its order and gains the columns
    by_auroc = contrast(ContrastConfig(theme_words="their", **common))["saes"]["sae"]["features"]
    aurocs = [r["auroc"] for r in by_auroc if r["significant"]]
    assert aurocs == sorted(aurocs, reverse=True)
    assert all("output_effect" in r and "junk" in r for r in by_auroc)
    with pytest.raises(SaeforgeError, match="unknown ranking"):
        contrast(ContrastConfig(rank_by="vibes", **common))
    # the default effect: the first-order gradient, candidates steered for real (theme shift, promoted tokens)
    common["effect"] = "gradient"
    steered = contrast(ContrastConfig(rank_by="output-effect", min_word_fraction=0.0, **common))
    rows = steered["saes"]["sae"]["features"]
    effects = [r["output_effect"] for r in rows]
    assert steered["effect"] == "gradient" and effects == sorted(effects, reverse=True) and len(rows) == 5
    assert all(isinstance(r["theme_shift"], float) and len(r["promoted"]) == 10 for r in rows)


def test_theme_words_from_texts_by_hand():
    from saeforge.features.contrast import theme_words_from_texts

    pos = ["the king is here", "the queen and the king", "a royal king"]
    neg = ["the cat is here", "a dog and a cat", "the queen of spades"]
    # share of texts: king 3/3 − 0 = 1; royal 1/3; queen 2/3 − 1/3 = 1/3 but not 3× as common; the/and/is/here tie
    assert theme_words_from_texts(pos, neg) == ["king", "royal"]
    assert theme_words_from_texts(pos, neg, n=1) == ["king"]
    assert theme_words_from_texts(neg, neg) == []
