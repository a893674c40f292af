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


def test_batched_reading_equals_one_text_at_a_time(tiny_llama):
    texts = ["The king slept.", "On Monday my sister bought three red apples at the market.", "Blue."]
    one = C.concept_activations(tiny_llama, SITE, texts, progress=False, batch_size=1)
    many = C.concept_activations(tiny_llama, SITE, texts, progress=False, batch_size=3)
    assert one[0].shape[0] == sum(len(C.label_text(tiny_llama.tokenizer, t)[0]) for t in texts)
    torch.testing.assert_close(many[0], one[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(many[1], one[1])


def test_list_texts_hold_one_concept_each():
    texts = C.list_texts(60, seed=2)
    assert texts == C.list_texts(60, seed=2) and all(t.endswith(".") for t in texts)
    for t in texts:
        words = [w.lower() for w in t.rstrip(".").split(", ")]
        owners = {c for c, ws in C.CONCEPT_WORDS.items() if {w.lower() for w in ws} >= set(words)}
        assert len(owners) == 1 and 4 <= len(words) <= 7
    assert {w for t in C.list_texts(40, ["day"]) for w in t.rstrip(".").split(", ")} <= \
        {w for d in C.CONCEPT_WORDS["day"] for w in (d, d.capitalize())}


class _Ctx:
    def __init__(self, positions):
        self.positions = positions


def test_latent_swap_edit_by_hand():
    torch.manual_seed(0)
    sae = make_sae(AlignSAEConfig(d_in=6, d_sae=8, concepts=("day", "colour")))
    latents = C.ConceptLatents(sae, {"day": 6, "colour": 7}, {"day": 1.0, "colour": 1.0})
    rows = [("day", "colour", "p"), ("colour", "day", "q")]
    x = torch.randn(2, 3, 6)
    positions = torch.tensor([[-1, 0, 1], [0, 1, 2]])  # padding, BOS, then tokens
    out = C._row_edit("latent", rows, 0.5, 4.0, latents=latents)(x, _Ctx(positions))
    z = sae.encode(x).detach()
    W = sae.W_dec.detach()
    for r, (i, j) in enumerate([(6, 7), (7, 6)]):
        value = 0.5 * 4.0 / W[j].norm()  # the target's decoder row written at norm 2
        for t in range(3):
            want = x[r, t] if positions[r, t] < 1 else \
                x[r, t] - z[r, t, i] * W[i] + (value - z[r, t, j]) * W[j]
            torch.testing.assert_close(out[r, t], want)
    caa = C._row_edit("caa", rows, 0.5, 4.0, means={"day": torch.ones(6), "colour": torch.zeros(6)})(x, _Ctx(positions))
    step = -torch.ones(6) / 6 ** 0.5 * 2.0  # colour − day, unit, at norm 0.5 × 4
    torch.testing.assert_close(caa[0, 2], x[0, 2] + step)
    torch.testing.assert_close(caa[1, 1:], x[1, 1:] - step)
    torch.testing.assert_close(caa[0, :2], x[0, :2])


def test_swap_that_must_work_does_and_the_plain_model_judges_it(tiny_llama, monkeypatch):
    """At the last layer, a target decoder row along one word's unembedding, written large, makes the model say the
    word: the target rate goes from 0 to 1, judged on the text; strength 0 is the plain model's greedy text."""
    from saeforge.interventions.generate import sample

    lm, site = tiny_llama, "layers.2.resid_post"
    rows = C.swap_rows(["day", "colour"], 2)
    clean = C.concept_swap(lm, site, rows, "caa", 0.0, means={}, max_new_tokens=4)
    vocab = lm.tokenizer.convert_ids_to_tokens(list(range(len(lm.tokenizer))))
    word = next(t[1:] for t in vocab if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3
                and not any(t[1:] in g for g in clean.continuations))
    token = lm.tokenizer.convert_tokens_to_ids("Ġ" + word)
    monkeypatch.setitem(C.CONCEPT_WORDS, "colour", (word,))
    monkeypatch.setitem(C.CONCEPT_WORDS, "day", (word,))
    direction = lm.model.get_output_embeddings().weight[token].detach().float()
    assert int(lm.direction_logits(direction[None])[0].argmax()) == token  # the setup: this row says the word
    torch.manual_seed(0)
    sae = make_sae(AlignSAEConfig(d_in=lm.site(site).d, d_sae=8, concepts=("day", "colour")))
    with torch.no_grad():
        sae.W_dec[6:] = direction
    latents = C.ConceptLatents(sae, {"day": 6, "colour": 7}, {"day": 1.0, "colour": 1.0})
    assert sum(clean.target_hit) == 0
    swapped = C.concept_swap(lm, site, rows, "latent", 1.0, latents=latents, norm=1000.0, max_new_tokens=4)
    assert all(swapped.target_hit) and swapped.continuations != clean.continuations
    assert all(p > 0 for p in swapped.perplexity) and len(swapped.perplexity) == len(rows)
    # strength 0: the plain model's greedy continuation, unpadded prompt by prompt
    for (_, _, prompt), text in zip(rows, clean.continuations):
        ids = torch.tensor([[lm.bos_token_id()] + lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        alone = sample(lm, ids, torch.ones_like(ids), max_new_tokens=4, temperature=0.0, seed=0)
        assert lm.tokenizer.decode(alone[0], skip_special_tokens=True) == text


def test_bad_swap_settings_fail_before_loading():
    good = dict(path="run/saes/x", out="o")
    for kw, match in [(dict(path=""), "no SAE"), (dict(out=""), "no output folder"),
                      (dict(concepts=("day",)), "two concepts"), (dict(concepts=("day", "weather")), "weather"),
                      (dict(concepts=("day", "day")), "repeat"), (dict(strengths=()), "strengths"),
                      (dict(strengths=(0.5, -1.0)), "strengths"), (dict(n_prompts=0), "n-prompts"),
                      (dict(n_lines=-1), "negative")]:
        with pytest.raises(SaeforgeError, match=match):
            C.check_swap_config(C.ConceptSwapConfig(**{**good, **kw}))


def test_concept_swap_command_runs(tiny_run, tmp_path):
    import json

    from saeforge.cli import main

    out = tmp_path / "swap"
    args = ["concept-swap", str(tiny_run / "saes" / "layers.1.resid_post"), "--out", str(out), "--concepts", "day",
            "colour", "number", "--n-templates", "24", "--n-lists", "12", "--n-lines", "0", "--d-sae", "32",
            "--steps", "30", "--batch-size", "64", "--n-prompts", "1", "--max-new-tokens", "3", "--strengths",
            "0.5", "2"]
    assert main(args) == 0
    report = json.loads((out / "concept_swap.json").read_text())
    assert report["site"] == "layers.1.resid_post" and report["concepts"] == ["day", "colour", "number"]
    assert [(r["method"], r["strength"]) for r in report["swaps"]] == [("clean", 0.0)] + [
        (m, s) for s in (0.5, 2.0) for m in ("alignsae", "topk", "caa")]
    assert all(len(r["examples"]) == 6 for r in report["swaps"])  # 3 × 2 ordered pairs, one prompt each
    assert set(report["alignsae"]["latents"]) == {"day", "colour", "number"}
    assert all(0 <= v["auroc"] <= 1 for v in report["alignsae"]["latents"].values())
    # a strong CAA push at a middle layer of a random model changes what it writes
    clean, strong = report["swaps"][0], report["swaps"][-1]
    assert [e["continuation"] for e in strong["examples"]] != [e["continuation"] for e in clean["examples"]]
    kept = [out / "run" / "saes" / "layers.1.resid_post" / "cfg.json", out / "cache" / "manifest.json",
            out / "held_out" / "manifest.json"]
    stamps = [p.stat().st_mtime_ns for p in kept]
    assert main(args) == 0  # the rerun reuses the activations and the trained AlignSAE
    assert [p.stat().st_mtime_ns for p in kept] == stamps
    again = json.loads((out / "concept_swap.json").read_text())
    assert again["swaps"] == report["swaps"] and again["alignsae"] == report["alignsae"]
    # other settings on the same folder are refused before anything is read
    with pytest.raises(SaeforgeError, match="other settings.*steps: 30") as err:
        C.concept_swap_demo(C.ConceptSwapConfig(path=args[1], out=str(out), concepts=("day", "colour", "number"),
                                                n_templates=24, n_lists=12, n_lines=0, d_sae=32, steps=31,
                                                batch_size=64), progress=False)
    assert "--out" in err.value.fix
