import math

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.interventions.generate import run_steering
from saeforge.interventions.steering import FeatureEdit, Steerer, parse_feature

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


def test_steering_moves_the_target_feature_and_reports_the_cost(steerer):
    sae = steerer.saes[SITE][0]
    run = run_steering(steerer, PROMPTS, [FeatureEdit(SITE, 9, "clamp", 25.0, "raw")], max_new_tokens=8, seed=1)
    e = run.metrics["edits"][0]
    assert e["target_activation_steered"] > e["target_activation_baseline"] + 5
    assert run.metrics["kl_prompt"] > 0
    assert all(math.isfinite(p) and p > 1 for p in run.metrics["perplexity_steered"])
    assert len(run.steered) == 2 and sae.cfg.d_sae == 128


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
