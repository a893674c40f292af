"""Steering vectors against hand-computed cases: CAA, STA (atoms, normalisation, trimming, rescaling), SAE-refined CAA
(relevant features by Mann–Whitney + FDR, least-squares projection), and the per-text means they start from."""

import math
from types import SimpleNamespace

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.interventions.vectors import TextActivations, caa_vector, collect, refined_caa_vector, sta_vector

W4 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])  # decoder rows, d = 3


def _acts(acts, feats):
    return TextActivations(torch.tensor(acts, dtype=torch.float32), torch.tensor(feats, dtype=torch.float32))


def test_caa_is_the_difference_of_the_text_means():
    pos = _acts([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0]], [[0.0] * 4] * 2)
    neg = _acts([[0.0, 0.0, 1.0], [2.0, 2.0, 1.0]], [[0.0] * 4] * 2)
    assert caa_vector(pos, neg).tolist() == [1.0, 2.0, -1.0]


def test_sta_by_hand():
    # latent activations per text (means over tokens)
    pos = _acts([[0.0] * 3] * 2, [[2, 0, 1, 0], [4, 0, 1, 1]])
    neg = _acts([[0.0] * 3] * 2, [[0, 1, 1, 0], [0, 1, 0, 0]])
    caa = torch.tensor([3.0, 4.0, 0.0])  # norm 5
    # Δa = [3, −1, 0.5, 0.5]; Δf (texts fired on) = [2, −2, 1, 1]
    # signed min–max of |Δa| (min 0.5, max 3): [1, −0.2, 0, 0]; of |Δf| (min 1, max 2): [1, −1, 0, 0]
    # sign-consistent and non-zero: latents 0 and 1
    # trim 0.5: thresholds at the median of |na| over {0, 1} = 0.6 and of |nf| = 1 → only latent 0 is kept
    v, atoms = sta_vector(SimpleNamespace(W_dec=W4), pos, neg, caa, trim=0.5)
    assert atoms.tolist() == [0]
    torch.testing.assert_close(v, torch.tensor([5.0, 0.0, 0.0]))  # 3·W[0], rescaled to ‖v_CAA‖ = 5
    # trim 1 keeps both consistent latents: 3·W[0] − 1·W[1] = (3, −2, 0), rescaled to norm 5
    v, atoms = sta_vector(SimpleNamespace(W_dec=W4), pos, neg, caa, trim=1.0)
    assert atoms.tolist() == [0, 1]
    torch.testing.assert_close(v, torch.tensor([3.0, -2.0, 0.0]) * 5 / math.sqrt(13))
    with pytest.raises(SaeforgeError, match="trim must lie in"):
        sta_vector(SimpleNamespace(W_dec=W4), pos, neg, caa, trim=0.0)
    same = _acts([[0.0] * 3] * 2, [[1, 1, 1, 1]] * 2)
    with pytest.raises(SaeforgeError, match="no SAE latent differs consistently"):
        sta_vector(SimpleNamespace(W_dec=W4), same, same, caa)


def test_sta_uses_firing_rates_when_the_sets_differ_in_size():
    # three positive texts, one negative. Latent 0 fires on 2 of 3 positives (rate 2/3) and on the negative (rate 1):
    # counts would say +1 (consistent with Δa = +1.5), rates say −1/3 (inconsistent), so STA drops it.
    pos = _acts([[0.0] * 3] * 3, [[3, 1, 0, 0], [3, 1, 0, 0], [0, 1, 0, 0]])
    neg = _acts([[0.0] * 3], [[0.5, 0, 1, 0]])
    caa = torch.tensor([0.0, 3.0, 4.0])  # norm 5
    # Δa = [1.5, 1, −1, 0] → signed min–max [1, 2/3, −2/3, 0]; Δf = [−1/3, 1, −1, 0] → [−1/3, 1, −1, 0]
    # consistent: latents 1 (+, +) and 2 (−, −); trim 1 keeps both: v = W[1] − W[2] = (0, 2, −1), rescaled to 5
    v, atoms = sta_vector(SimpleNamespace(W_dec=W4), pos, neg, caa, trim=1.0)
    assert atoms.tolist() == [1, 2]
    torch.testing.assert_close(v, torch.tensor([0.0, 2.0, -1.0]) * 5 / math.sqrt(5))
    # the same texts with the negative repeated three times: equal sizes, rates = counts / 3, the same selection
    v3, atoms3 = sta_vector(SimpleNamespace(W_dec=W4), pos, _acts([[0.0] * 3] * 3, [[0.5, 0, 1, 0]] * 3), caa,
                            trim=1.0)
    assert atoms3.tolist() == [1, 2]
    torch.testing.assert_close(v3, v)


def _sets(n=12):
    """Latent 0 and 1 higher on every positive text, latent 2 the same on both, latent 3 higher on the negatives."""
    pos_feats = [[2.0 + i, 1.0 + 0.1 * i, 0.5 if i % 2 else 0.0, 0.0] for i in range(n)]
    neg_feats = [[0.1 * i, 0.0, 0.5 if i % 2 else 0.0, 1.0 + i] for i in range(n)]
    pos = _acts([[2.0, 1.0, 3.0]] * n, pos_feats)
    neg = _acts([[0.0, 0.0, 0.0]] * n, neg_feats)
    return pos, neg


def test_refined_caa_keeps_the_components_on_the_relevant_features():
    pos, neg = _sets()
    caa = caa_vector(pos, neg)
    assert caa.tolist() == [2.0, 1.0, 3.0]
    # relevant: latents 0 and 1 (every positive above every negative: p ≈ 1e-5, far below FDR 5 %); latent 2 is
    # tied across the sets, latent 3 is higher on the negatives. Their decoder rows span the first two axes,
    # so the projection of v_CAA is (2, 1, 0).
    v, relevant = refined_caa_vector(SimpleNamespace(W_dec=W4), pos, neg, caa)
    assert relevant.tolist() == [0, 1]
    torch.testing.assert_close(v, torch.tensor([2.0, 1.0, 0.0]))
    # non-orthogonal rows: (1, 1, 0)/√2 and (1, 0, 0) span the same plane: the same projection
    skew = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    skew[0] /= math.sqrt(2)
    v, _ = refined_caa_vector(SimpleNamespace(W_dec=skew), pos, neg, caa)
    torch.testing.assert_close(v, torch.tensor([2.0, 1.0, 0.0]))
    # one relevant row (1, 1, 1): the projection of (2, 1, 3) onto it is 2·(1, 1, 1)
    only = pos.feats.clone()
    only[:, 1] = neg.feats[:, 1]
    v, relevant = refined_caa_vector(SimpleNamespace(W_dec=W4[[3, 1, 2, 0]]), TextActivations(pos.acts, only), neg,
                                     caa)
    assert relevant.tolist() == [0]
    torch.testing.assert_close(v, torch.tensor([2.0, 2.0, 2.0]))


def test_refined_caa_refuses_when_nothing_is_relevant():
    _, neg = _sets()
    same = TextActivations(neg.acts, neg.feats)  # the positives are the negatives: no latent differs
    with pytest.raises(SaeforgeError, match="no feature fires significantly more"):
        refined_caa_vector(SimpleNamespace(W_dec=W4), same, neg, caa_vector(same, neg))


def test_collect_means_over_the_sae_data_positions(tiny_llama):
    from saeforge.saes import TopKConfig, make_sae

    torch.manual_seed(0)
    sae = make_sae(TopKConfig(d_in=32, d_sae=16, k=4)).eval()
    site = "layers.1.resid_post"
    texts = ["To be, or not to be", "Now is the winter of our discontent made glorious summer"]
    got = collect(tiny_llama, sae, site, texts)
    for i, t in enumerate(texts):
        tokens = tiny_llama.tokenizer(t, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([[tiny_llama.bos_token_id()] + tokens])
        x = tiny_llama.read(ids, [site])[site][0, 1:]  # BOS is not SAE data
        torch.testing.assert_close(got.acts[i], x.mean(0), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(got.feats[i], sae.encode(x).mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(SaeforgeError, match="fewer than 2 usable texts"):
        collect(tiny_llama, sae, site, texts[:1])


def test_collect_with_prompts_averages_the_answer_tokens_only(tiny_llama):
    from saeforge.saes import TopKConfig, make_sae

    torch.manual_seed(0)
    sae = make_sae(TopKConfig(d_in=32, d_sae=16, k=4)).eval()
    site = "layers.1.resid_post"
    prompts = ["Question: what is the weather?", "Tell me a story"]
    answers = [" It rains all day", " Once upon a time there was a king who ruled the land"]
    got = collect(tiny_llama, sae, site, answers, prompts=prompts)
    tok = tiny_llama.tokenizer
    for i, (q, a) in enumerate(zip(prompts, answers)):
        head = [tiny_llama.bos_token_id()] + tok(q, add_special_tokens=False)["input_ids"]
        tail = tok(a, add_special_tokens=False)["input_ids"]
        x = tiny_llama.read(torch.tensor([head + tail]), [site])[site][0, len(head):]  # the answer's positions
        torch.testing.assert_close(got.acts[i], x.mean(0), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(got.feats[i], sae.encode(x).mean(0), rtol=1e-5, atol=1e-6)
    stripped = collect(tiny_llama, sae, site, [a.strip() for a in answers], prompts=prompts)  # read with the space
    torch.testing.assert_close(stripped.acts, got.acts)
    whole = collect(tiny_llama, sae, site, [q + a for q, a in zip(prompts, answers)])
    assert not torch.allclose(whole.acts, got.acts, atol=1e-3)  # the prompt's tokens really are left out
    with pytest.raises(SaeforgeError, match="1 prompts for 2 answers"):
        collect(tiny_llama, sae, site, answers, prompts=prompts[:1])
    with pytest.raises(SaeforgeError, match="the answer to prompt 2 is empty"):
        collect(tiny_llama, sae, site, [answers[0], "  "], prompts=prompts)


W6 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [3.0, 4.0, 0.0], [0.0, 0.0, 1.0],
                   [1.0, 0.0, 1.0]])
U6 = W6 / W6.norm(dim=1, keepdim=True)


def _rsv_sets(n=12):
    """Latent 0 relevant (higher on every positive), latent 1 equally active on both sets (noise), latent 2 only on
    the negatives, latents 3–5 never fire; v_CAA = (3, 4, 0)."""
    pos = _acts([[3.0, 4.0, 0.0]] * n, [[2.0 + i, 1.0 + i % 2, 0, 0, 0, 0] for i in range(n)])
    neg = _acts([[0.0, 0.0, 0.0]] * n, [[0.1 * i, 1.0 + i % 2, 1.0 + i, 0, 0, 0] for i in range(n)])
    return pos, neg


def test_sae_rsv_stages_by_hand():
    from saeforge.interventions.vectors import sae_rsv_vector

    pos, neg = _rsv_sets()
    caa = caa_vector(pos, neg)
    sae = SimpleNamespace(W_dec=W6)
    # relevant: {0}. Denoise: latents active on the positives are 0 (mean 7.5) and 1 (mean 1.5); 1 is not relevant,
    # so v_noise = d̂_1 = (0, 1, 0). Augment: latents never firing on the positives are 2–5; closest to d̂_0 = (1,0,0)
    # by cosine: 5 (1/√2), then 3 (0.6) → v_useful = (d̂_5 + d̂_3)/2. ‖v_CAA‖ = 5, α = (1, 0.5, 0.5).
    v_noise, v_useful = U6[1], (U6[5] + U6[3]) / 2
    v, info = sae_rsv_vector(sae, pos, neg, caa, n_augment=2)
    assert info == {"relevant": [0], "noise": [1], "useful": [5, 3]}
    torch.testing.assert_close(v, caa - 2.5 * v_noise + 2.5 * v_useful)
    v, info = sae_rsv_vector(sae, pos, neg, caa, augment=False)
    assert info["useful"] == []
    torch.testing.assert_close(v, torch.tensor([3.0, 1.5, 0.0]))
    v, info = sae_rsv_vector(sae, pos, neg, caa, denoise=False, n_augment=2)
    assert info["noise"] == []
    torch.testing.assert_close(v, caa + 2.5 * v_useful)
    v, _ = sae_rsv_vector(sae, pos, neg, caa, denoise=False, augment=False, alphas=(2.0, 0.5, 0.5))
    torch.testing.assert_close(v, 2 * caa)
    # a judge that calls latents 0 and 5 irrelevant: 0 joins the noise (weights 7.5 : 1.5), 5 is never added
    judge = lambda idx: [j in (0, 5) for j in idx]  # noqa: E731
    v, info = sae_rsv_vector(sae, pos, neg, caa, n_augment=1, irrelevant=judge)
    assert info == {"relevant": [0], "noise": [0, 1], "useful": [3]}
    torch.testing.assert_close(v, caa - 2.5 * (7.5 * U6[0] + 1.5 * U6[1]) / 9 + 2.5 * U6[3])
    with pytest.raises(SaeforgeError, match="at least one candidate"):
        sae_rsv_vector(sae, pos, neg, caa, candidates=0)
    with pytest.raises(SaeforgeError, match="no feature fires significantly more"):
        sae_rsv_vector(sae, neg, neg, caa)
