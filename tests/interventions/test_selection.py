"""Choosing features by output effect: the junk rule, theme words and rates, the standardised direct effect (hand-made
logit lens and the real one), the ranking with junk rejected, and the gradient effect against finite differences."""

import math
from types import SimpleNamespace

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.interventions.selection import (NEUTRAL_PROMPTS, LogitLens, direct_effect, gradient_effect, is_junk,
                                              is_word_token, parse_words, promoted_words, rank_by_output_effect,
                                              steered_shifts, texts_mean_norm, theme_features, theme_hits, theme_rate,
                                              theme_tokens, word_fraction, word_scores)
from saeforge.runs import BoundSAE
from saeforge.saes import TopKConfig, make_sae

@pytest.mark.parametrize("token, word", [
    (" king", True), (" Queen", True), (" o'er", True), (" well-born", True), (" rhythm", True),  # y is a vowel
    (" king's", True), (" emperor", True),
    ("King", False), ("ington", False), ("ing", False), ("ed", False),  # no leading space: a piece (or line start)
    (" thr", False), (" Mr", False),  # no vowel: a cut-off word start or an abbreviation
    (",", False), (" ,", False), (" .", False), ("...", False), (" 1984", False), (" x", False), (" a", False),
    ("\n", False), (" ", False), ("", False), (" -king", False), (" é", False), ("  king", False),
])
def test_word_tokens(token, word):
    assert is_word_token(token) is word


def test_word_fraction_and_the_junk_rule():
    tokens = [" king", " queen", "ington", ",", " thr", " crown", " the", "...", " royal", "ing"]
    assert word_fraction(tokens) == pytest.approx(0.5)  # king, queen, crown, the, royal
    assert not is_junk(tokens)  # half are words: kept at the default ½
    assert is_junk(tokens, min_word_fraction=0.6)
    # what the embedded model's steered features promote (docs/steering.md): a pharaoh writer and a piece writer
    assert not is_junk([" Arabia", " Judah", " Assyria", " pharaoh", " emperor", "rath", " king", " Emperor",
                        " Pharaoh", " Assyrian"])
    assert is_junk(["nings", "ation", "ming", "ulo", "ing", "ed", "isation", "ned", " Alban", "nia"])
    assert word_fraction([]) == 0.0 and is_junk([])


def test_parse_words_and_theme_hits():
    assert parse_words("King, queen crown,,king") == ["king", "queen", "crown"]
    assert parse_words(["king,queen", "Throne"]) == ["king", "queen", "throne"]
    with pytest.raises(SaeforgeError, match="must be words"):
        parse_words("king,c4t")
    texts = ["The King is dead.", "a kingdom of its own", "QUEEN", "nothing here", "the king's crown"]
    assert theme_hits(texts, ["king", "queen"]) == [True, False, True, False, True]  # whole words: not "kingdom"
    assert theme_rate(texts, ["king", "queen"]) == pytest.approx(3 / 5)
    assert math.isnan(theme_rate(texts, [])) and math.isnan(theme_rate([], ["king"]))
    assert theme_hits(["a.b"], ["a.b"]) == [True] and theme_hits(["axb"], ["a.b"]) == [False]  # escaped


def test_theme_tokens_are_the_single_token_forms(tiny_llama):
    tok = tiny_llama.tokenizer
    forms = theme_tokens(tok, ["the", "their", "winter"])
    one = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert forms["the"] == one(" the") and forms["their"] == one(" their")
    assert forms["winter"] == []  # several tokens in every form
    to = theme_tokens(tok, ["to"])["to"]
    assert to == [one(" to")[0], one("To")[0]]  # " to" and the capitalised bare "To" are tokens


# ------------------------------------------------------------------------------------------------- direct effect
def _lens(M: torch.Tensor, tokenizer=None) -> LogitLens:
    """A lens over a hand-made M (the fake model's direction_logits is M itself)."""
    return LogitLens(SimpleNamespace(tokenizer=tokenizer, d_model=M.shape[0], direction_logits=lambda d: d @ M))


def test_standardised_effect_by_hand():
    # two residual dimensions, five tokens
    M = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 0.0, 0.0, 0.0, 10.0]])
    lens = _lens(M)
    u = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    z = lens.standardised(u, [4, 0])
    # direction e0: logits 1..5, mean 3, population std √2 → z(4) = 2/√2, z(0) = −2/√2
    assert z[0].tolist() == pytest.approx([2 / math.sqrt(2), -2 / math.sqrt(2)], rel=1e-6)
    # direction (0.6, 0.8): logits 0.6, 1.2, 1.8, 2.4, 11 (mean 3.4)
    logits = torch.tensor([0.6, 1.2, 1.8, 2.4, 11.0])
    sd = float(((logits - 3.4) ** 2).mean().sqrt())
    assert z[1].tolist() == pytest.approx([(11 - 3.4) / sd, (0.6 - 3.4) / sd], rel=1e-6)
    # per word the best form, then the mean over words: word A = tokens {4, 0}, word B = {1}
    forms = {"a": [4, 0], "b": [1]}
    zz = lens.standardised(u, [4, 0, 1])
    assert word_scores(zz, forms).flatten().tolist() == pytest.approx(
        [float(zz[0, 0]), float(zz[0, 2]), float(zz[1, 0]), float(zz[1, 2])])
    assert direct_effect(lens, u, forms).tolist() == pytest.approx(
        [(float(zz[0, 0]) + float(zz[0, 2])) / 2, (float(zz[1, 0]) + float(zz[1, 2])) / 2])
    assert direct_effect(lens, 7 * u, forms).tolist() == pytest.approx(direct_effect(lens, u, forms).tolist())


def test_the_logit_lens_matches_direction_logits(tiny_llama):
    lens = LogitLens(tiny_llama)
    torch.manual_seed(0)
    u = torch.randn(5, tiny_llama.d_model)
    full = tiny_llama.direction_logits(u).float()
    torch.testing.assert_close(lens.logits(u), full, rtol=1e-5, atol=1e-5)
    tokens = [3, 17, 262]
    expected = (full[:, tokens] - full.mean(1, keepdim=True)) / full.std(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(lens.standardised(u, tokens), expected, rtol=1e-4, atol=1e-4)
    assert [t for t, _ in lens.promoted(u[0], 3)] == [lens.vocab[int(i)] for i in full[0].topk(3).indices]


# ------------------------------------------------------------------------------------------------- ranking
class _FakeLM:
    """A model whose direct logit effects are a hand-made matrix (d_model 4) over the tiny tokenizer's vocabulary."""

    def __init__(self, tokenizer, M):
        self.tokenizer, self.M, self.d_model = tokenizer, M, M.shape[0]

    def direction_logits(self, directions):
        return directions.float() @ self.M


def _planted(tokenizer):
    """M with: e0 → words and ' their' (+6); e1 → junk and ' their' (+20); e2 → words, not ' their'; e3 → −' their'."""
    one = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    words = [one(w) for w in (" the", " and", " of", " to", " is", " no", " or", " be", " by")]
    junk = [one(c) for c in (",", ":", ".", "'", ";", "?", "!", "-", "(")]
    their = one(" their")
    M = torch.zeros(4, len(tokenizer))
    M[0, words], M[0, their] = 5.0, 6.0
    M[1, junk], M[1, their] = 10.0, 20.0
    M[2, words] = 5.0
    M[3, their] = -5.0
    return M, their


def _bound(W_dec, name="sae", d=4):
    sae = make_sae(TopKConfig(d_in=d, d_sae=W_dec.shape[0], k=2))
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
    site = SimpleNamespace(name="layers.0.resid_post", d=d)
    return BoundSAE(name, sae, (site,), (site,))


def test_ranking_drops_junk_and_puts_the_theme_writer_first(tiny_llama):
    tok = tiny_llama.tokenizer
    M, their = _planted(tok)
    lm = _FakeLM(tok, M)
    # features: 0 = e1 (junk, largest effect), 1 = 2·e0 (theme writer), 2 = e2, 3 = e3 (suppresses the theme)
    bound = _bound(torch.stack([torch.eye(4)[1], 2 * torch.eye(4)[0], torch.eye(4)[2], torch.eye(4)[3]]))
    sel = rank_by_output_effect(lm, bound, "their", method="direct", top=2)
    z = _lens(M).standardised(torch.eye(4), [their])[:, 0]
    assert sel.effect.tolist() == pytest.approx([float(z[1]), float(z[0]), float(z[2]), float(z[3])], rel=1e-5)
    assert float(z[1]) > float(z[0]) > float(z[2]) > float(z[3])  # the junk feature has the largest effect ...
    assert [r["feature"] for r in sel.rejected] == [0]  # ... and is rejected as junk
    assert [r["feature"] for r in sel.rows] == [1, 2] and sel.best == 1
    top = sel.rows[0]
    assert top["promoted"][0][0] == " their" and top["word_fraction"] == 1.0
    assert sel.forms == {"their": [" their"]} and sel.missing == []
    d = theme_features(lm, bound, ["their", "winter"], method="direct", top=1)  # JSON-ready; a word without a
    # single-token form noted
    assert d["features"][0]["feature"] == 1 and d["missing_words"] == ["winter"] and d["rejected"][0]["feature"] == 0
    assert promoted_words(lm, bound, 1, lens=_lens(M, tok))[0] == "their"
    assert promoted_words(lm, bound, 0, lens=_lens(M, tok)) == ["their"]  # the junk feature's only word


def test_ranking_refuses_bad_input(tiny_llama):
    M, _ = _planted(tiny_llama.tokenizer)
    lm = _FakeLM(tiny_llama.tokenizer, M)
    bound = _bound(torch.eye(4))
    with pytest.raises(SaeforgeError, match="none of the theme words"):
        rank_by_output_effect(lm, bound, "winter,discontent", method="direct")
    with pytest.raises(SaeforgeError, match="unknown output-effect method"):
        rank_by_output_effect(lm, bound, "their", method="vibes")
    with pytest.raises(SaeforgeError, match="no theme words"):
        rank_by_output_effect(lm, bound, " ,", method="direct")
    wide = _bound(torch.eye(4), d=4)
    wide.writes[0].d = 8
    with pytest.raises(SaeforgeError, match="not the residual stream"):
        rank_by_output_effect(_FakeLM(tiny_llama.tokenizer, torch.zeros(8, 320)), wide, "their", method="direct")


# ------------------------------------------------------------------------------------------------- gradient effect
def test_gradient_effect_matches_finite_differences(tiny_model_dirs):
    from saeforge.data.prompts import PromptEncoder
    from saeforge.runs import SiteBinding, bind
    from tests.models.test_gradients import float64_model

    lm = float64_model(tiny_model_dirs["llama"], "llama")
    torch.manual_seed(0)
    sae = make_sae(TopKConfig(d_in=32, d_sae=24, k=4, apply_b_dec_to_input=False)).double().eval()
    site = "layers.1.resid_post"
    bound = bind("sae", sae, SiteBinding.single(site), lm)
    forms = theme_tokens(lm.tokenizer, ["the", "their", "to"])
    ids = [t for v in forms.values() for t in v]
    texts = ["To be, or not to be", "Now is the winter of our discontent"]
    effect = gradient_effect(lm, bound, forms, texts)
    batch = PromptEncoder(lm).batch(texts)
    keep = batch.keep

    def metric(i, eps):
        u = sae.W_dec[i].detach() / sae.W_dec[i].detach().norm()

        def add(x):
            return x + eps * u * keep[..., None].to(x)

        with lm.edit({site: add}):
            logits = lm.logits(batch.input_ids, batch.attention_mask)
        theme = torch.logsumexp(torch.log_softmax(logits, -1)[..., ids], -1)
        return float(theme[keep].mean())

    h = 1e-5
    for i in (0, 7, 23):
        fd = (metric(i, h) - metric(i, -h)) / (2 * h)
        assert float(effect[i]) == pytest.approx(fd, rel=1e-6, abs=1e-9)
    assert effect.shape == (24,) and float(effect.abs().max()) > 1e-3


# ------------------------------------------------------------------------------------------------- steered check
@pytest.fixture(scope="module")
def bound_tiny(tiny_llama):
    from saeforge.runs import SiteBinding, bind

    torch.manual_seed(3)
    sae = make_sae(TopKConfig(d_in=32, d_sae=24, k=4)).eval()
    return bind("sae", sae, SiteBinding.single("layers.1.resid_post"), tiny_llama)


def test_steered_shifts_match_a_forward_with_the_vector_added(tiny_llama, bound_tiny):
    from saeforge.data.prompts import PromptEncoder

    lm, site = tiny_llama, "layers.1.resid_post"
    texts = ["To be, or not to be", "Now is the winter of our discontent"]
    forms = theme_tokens(lm.tokenizer, ["the", "to"])
    ids = [t for v in forms.values() for t in v]
    torch.manual_seed(1)
    vectors = torch.randn(3, 32) * 2
    got = steered_shifts(lm, bound_tiny, vectors, forms, texts, n_promoted=4, chunk=2)  # chunks of 2 and 1
    batch = PromptEncoder(lm).batch(texts)
    keep = batch.keep
    base = torch.log_softmax(lm.logits(batch.input_ids, batch.attention_mask), -1)[keep]
    vocab = lm.tokenizer.batch_decode([[i] for i in range(len(lm.tokenizer))])
    for v, row in zip(vectors, got):
        with lm.edit({site: lambda x, v=v: x + v * keep[..., None]}):
            lp = torch.log_softmax(lm.logits(batch.input_ids, batch.attention_mask), -1)[keep]
        shift = (torch.logsumexp(lp[:, ids], -1) - torch.logsumexp(base[:, ids], -1)).mean()
        assert row["theme_shift"] == pytest.approx(float(shift), rel=1e-4, abs=1e-6)
        change = (lp - base).mean(0)
        assert [t for t, _ in row["promoted"]] == [vocab[int(i)] for i in change.topk(4).indices]
        assert [c for _, c in row["promoted"]] == pytest.approx(change.topk(4).values.tolist(), abs=1e-3)
    assert steered_shifts(lm, bound_tiny, vectors[:1], {}, texts)[0]["theme_shift"] is None
    x = lm.read(batch.input_ids, [site], attention_mask=batch.attention_mask)[site][keep]
    assert texts_mean_norm(lm, site, texts) == pytest.approx(float(x.norm(dim=-1).mean()), rel=1e-6)


def test_gradient_ranking_steers_the_best_candidates_and_drops_the_junk(tiny_llama, bound_tiny):
    lm = tiny_llama
    sel = rank_by_output_effect(lm, bound_tiny, "the,to", top=3, candidates=8, min_word_fraction=0.0, include=[23],
                                strength=0.5, mean_norm=10.0)
    forms = {w: v for w, v in theme_tokens(lm.tokenizer, ["the", "to"]).items()}
    torch.testing.assert_close(sel.effect, gradient_effect(lm, bound_tiny, forms, NEUTRAL_PROMPTS))
    ranked = sel.effect.argsort(descending=True)[:8].tolist()
    assert [r["feature"] for r in sel.rows] == ranked[:3]  # nothing is junk at a word share of 0
    assert [r["effect"] for r in sel.rows] == sorted((r["effect"] for r in sel.rows), reverse=True)
    assert set(sel.checked) == set(ranked) | {23} and sel.strength == 0.5
    # each candidate was steered with its unit direction × 0.5 × 10
    units = bound_tiny.sae.W_dec.detach() / bound_tiny.sae.W_dec.detach().norm(dim=1, keepdim=True)
    f = sel.rows[0]["feature"]
    again = steered_shifts(lm, bound_tiny, units[f:f + 1] * 5.0, forms, NEUTRAL_PROMPTS)[0]
    assert again["theme_shift"] == pytest.approx(sel.rows[0]["theme_shift"], rel=1e-5)
    strict = rank_by_output_effect(lm, bound_tiny, "the,to", top=3, candidates=8, mean_norm=10.0,
                                   min_word_fraction=0.2)
    assert all(r["word_fraction"] < 0.2 for r in strict.rejected) and all(r["word_fraction"] >= 0.2
                                                                          for r in strict.rows)
    kept = [i for i in ranked if sel.checked[i]["word_fraction"] >= 0.2]
    assert [r["feature"] for r in strict.rows] == kept[:3]  # the junk is skipped, the order kept
    assert len(strict.rows) == min(3, len(kept)) and len(strict.rejected) == 8 - len(kept)
