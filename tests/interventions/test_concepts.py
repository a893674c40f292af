"""The concept set behind AlignSAE: AUROC, token labels, prompts, best latents, the concept swap, bad input."""

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.interventions import concepts as C
from saeforge.saes import AlignSAEConfig, make_sae

SITE = "layers.1.resid_post"


def test_auroc_by_hand():
    assert C.auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert C.auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 1])) == 1.0
    assert C.auroc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([0, 1, 1])) == 0.0
    # ties count half: every pair tied
    assert C.auroc(torch.ones(6), torch.tensor([0, 1, 0, 1, 0, 1])) == pytest.approx(0.5)
    # one tie across the classes among 2 × 2 pairs: (1 + 1 + 0.5 + 1) / 4
    assert C.auroc(torch.tensor([0.0, 1.0, 1.0, 2.0]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.875)
    assert C.auroc(torch.ones(3), torch.ones(3)) != C.auroc(torch.ones(3), torch.ones(3))  # NaN: one class


def test_token_labels_follow_the_words(tiny_llama):
    tok = tiny_llama.tokenizer
    text = "The King gave three red roses to his sister on Monday."
    ids, labels = C.label_text(tok, text, ["royalty", "number", "colour", "family", "day"])
    assert ids == tok(text, add_special_tokens=False)["input_ids"] and labels.shape == (len(ids), 5)
    pieces = [tok.decode([i]) for i in ids]
    for j, word in enumerate(["King", "three", "red", "sister", "Monday"]):
        labelled = "".join(p for p, y in zip(pieces, labels[:, j]) if y > 0).strip()
        assert labelled == word, (word, labelled)
    # whole words only: "kingdom" and "tent" hold "king" and "ten" but are neither
    _, labels = C.label_text(tok, "the kingdom had a tent", ["royalty", "number"])
    assert labels.sum() == 0


def test_unknown_concepts_are_refused():
    with pytest.raises(SaeforgeError, match="unknown concept\\(s\\) 'weather'.*royalty, number") as err:
        C.check_concepts(["royalty", "weather"])
    assert "--concepts royalty number" in err.value.fix
    with pytest.raises(SaeforgeError, match="unknown concept"):
        C.list_prompts("weather")


def test_templates_and_list_prompts():
    texts = C.template_texts(50, seed=3)
    assert len(texts) == 50 and texts == C.template_texts(50, seed=3) and len(set(texts)) > 40
    days = C.list_prompts("day", 20)
    for p in days:  # three days in the week's order, then a comma
        words = p.rstrip(",").split(", ")
        i = C.CONCEPT_WORDS["day"].index(words[0])
        assert words == list(C.CONCEPT_WORDS["day"][i:i + 3]) and p.endswith(",")
    assert all(len(set(p.rstrip(",").split(", "))) == 3 for p in C.list_prompts("colour", 20))


def test_best_latent_is_the_one_that_separates_the_concept():
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(2000, 2, generator=g) < 0.3).float()
    acts = torch.randn(2000, 8, generator=g)
    acts[:, 5] += 4 * labels[:, 0]  # latent 5 reads concept 0, latent 2 concept 1 (noisier)
    acts[:, 2] += 1.5 * labels[:, 1]

    class Identity:
        device = torch.device("cpu")

        def encode(self, x):
            return torch.relu(x)

    best = C.best_latents(Identity(), acts, labels, ["royalty", "number"])
    assert best["royalty"]["latent"] == 5 and best["number"]["latent"] == 2
    assert best["royalty"]["auroc"] > 0.97 and 0.75 < best["number"]["auroc"] < 0.97
    assert best["royalty"]["mean_on"] == pytest.approx(float(torch.relu(acts[labels[:, 0] > 0, 5]).mean()))


def test_swap_edits_only_the_source_tokens_by_the_latent_difference(tiny_llama):
    lm = tiny_llama
    d = lm.site(SITE).d
    torch.manual_seed(0)
    sae = make_sae(AlignSAEConfig(d_in=d, d_sae=16, concepts=("day", "colour")))
    spec = C.SwapLatents(sae, {"day": sae.concept_index("day"), "colour": sae.concept_index("colour")},
                         {"day": 1.0, "colour": 1.0})
    prompts = ["Monday, Tuesday, Wednesday,"]
    clean = C.swap_effect(lm, SITE, spec, "day", "colour", prompts, 0.0)
    ids, lab = C.label_text(lm.tokenizer, prompts[0], ["day"])
    full = torch.tensor([[lm.bos_token_id()] + ids])
    p = lm.logits(full)[0, -1].softmax(-1)
    tgt = C.first_tokens(lm.tokenizer, C.CONCEPT_WORDS["colour"])
    assert clean["p_target"] == pytest.approx(float(p[tgt].sum()), rel=1e-5)
    # the same swap written by hand: x + (0 - z_day) d_day + (3 - z_colour) d_colour at the day tokens only
    where = [1 + t for t in lab[:, 0].nonzero().squeeze(1).tolist()]
    assert 3 <= len(where) < full.shape[1] - 1

    def by_hand(x):
        x = x.clone()
        z = sae.encode(x[0, where])
        i, j = spec.latents["day"], spec.latents["colour"]
        x[0, where] += -z[:, i, None] * sae.W_dec[i].detach() + (3.0 - z[:, j, None]) * sae.W_dec[j].detach()
        return x

    with lm.edit({SITE: by_hand}):
        q = lm.logits(full)[0, -1].softmax(-1)
    swapped = C.swap_effect(lm, SITE, spec, "day", "colour", prompts, 3.0)
    assert swapped["p_target"] == pytest.approx(float(q[tgt].sum()), rel=1e-5)
    assert swapped["p_target"] != pytest.approx(clean["p_target"], rel=1e-3)


def test_batched_reading_and_swapping_equal_one_text_at_a_time(tiny_llama):
    texts = ["The king slept.", "On Monday my sister bought three red apples at the market.", "Blue."]
    one = C.concept_activations(tiny_llama, SITE, texts, progress=False, batch_size=1)
    many = C.concept_activations(tiny_llama, SITE, texts, progress=False, batch_size=3)
    assert one[0].shape[0] == sum(len(C.label_text(tiny_llama.tokenizer, t)[0]) for t in texts)
    torch.testing.assert_close(many[0], one[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(many[1], one[1])
    torch.manual_seed(1)
    sae = make_sae(AlignSAEConfig(d_in=tiny_llama.site(SITE).d, d_sae=16, concepts=("number", "colour")))
    spec = C.SwapLatents(sae, {"number": 14, "colour": 15}, {"number": 1.0, "colour": 2.0})
    prompts = ["one, two, three,", "seven, eight, nine, ten, and then eleven,"]
    both = C.swap_effect(tiny_llama, SITE, spec, "number", "colour", prompts, 2.0)
    each = [C.swap_effect(tiny_llama, SITE, spec, "number", "colour", [p], 2.0) for p in prompts]
    for key in both:
        assert both[key] == pytest.approx(sum(e[key] for e in each) / 2, rel=1e-4, abs=1e-7)
