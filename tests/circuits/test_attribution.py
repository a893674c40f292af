"""Node attribution against exact activation patching on the tiny Llama in float64.

- The linear case: with the final norm removed, m is linear in the last residual stream, so attribution patching
  and integrated gradients of the last site's nodes equal exact patching up to rounding.
- The general case: integrated gradients of a site's nodes add up to the exact effect of patching the whole site
  (completeness), with an error that falls as 1/steps² (midpoint rule).
"""

import pytest
import torch

from saeforge.circuits.attribution import (attribute_nodes, circuit_saes, exact_node_effects, exact_site_effect)
from saeforge.circuits.tasks import EncodedTask, Task
from saeforge.errors import SaeforgeError
from tests.models.test_gradients import _sae, float64_model

SITES = ("layers.0.mlp_out", "layers.1.attn_out", "layers.1.resid_post", "layers.2.resid_post")


def random_task(lm, n=6, t=9, seed=0) -> EncodedTask:
    """Random prompts after BOS; each corrupt prompt differs from its clean one in two tokens."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, lm.vocab_size, (n, t), generator=g)
    clean[:, 0] = 0  # BOS: not SAE data
    corrupt = clean.clone()
    for i in range(n):
        cols = torch.randperm(t - 1, generator=g)[:2] + 1
        corrupt[i, cols] = torch.randint(3, lm.vocab_size, (2,), generator=g)
    answers = torch.randperm(lm.vocab_size - 3, generator=g)[: 2 * n].view(2, n) + 3
    keep = torch.ones(n, t, dtype=torch.bool)
    keep[:, 0] = False
    return EncodedTask(Task("random", ()), clean, corrupt, torch.ones(n, t, dtype=torch.long), keep,
                       torch.full((n,), t - 1), answers[0], answers[1])


@pytest.fixture(scope="module")
def setup(tiny_model_dirs):
    lm = float64_model(tiny_model_dirs["llama"], "llama")
    saes = circuit_saes(lm, {s: _sae(seed=i) for i, s in enumerate(SITES)})
    return lm, saes, random_task(lm)


@pytest.fixture(scope="module")
def linear(tiny_model_dirs):
    """The tiny Llama without its final norm: the logits are linear in layers.2.resid_post."""
    lm = float64_model(tiny_model_dirs["llama"], "llama")
    lm.model.model.norm = torch.nn.Identity()
    return lm, circuit_saes(lm, {"layers.2.resid_post": _sae(seed=7)}), random_task(lm, seed=1)


def _all_nodes(saes):
    return [(c.site, i) for c in saes for i in range(c.d_sae + 1)]


@pytest.mark.parametrize("method", ["atp", "ig"])
def test_linear_case_matches_exact_patching(linear, method):
    lm, saes, enc = linear
    effects = attribute_nodes(lm, enc, saes, method=method, steps=3, batch_size=4)
    exact = exact_node_effects(lm, enc, saes, _all_nodes(saes), batch_size=4).double()
    got = effects.effects[saes[0].site].double()
    assert exact.abs().max() > 1e-5  # the patch does something (logits of a random tiny model are small)
    assert torch.allclose(got, exact, rtol=1e-9, atol=1e-9 * float(exact.abs().max()))
    assert (exact != 0).sum() > 10  # many latents move, not only the error node


def test_linear_case_per_position(linear):
    lm, saes, enc = linear
    effects = attribute_nodes(lm, enc, saes, method="atp", per_position=True, batch_size=4)
    per_pos = effects.effects[saes[0].site].double()
    assert per_pos.shape == (enc.clean_ids.shape[1], saes[0].d_sae + 1)
    assert per_pos[0].abs().max() == 0  # BOS is not SAE data
    nodes = _all_nodes(saes)
    for position in (3, enc.clean_ids.shape[1] - 1):
        exact = exact_node_effects(lm, enc, saes, nodes, position=position, batch_size=6).double()
        assert torch.allclose(per_pos[position], exact, rtol=1e-9, atol=1e-9 * float(exact.abs().max()) + 1e-15)
    summed = attribute_nodes(lm, enc, saes, method="atp").effects[saes[0].site].double()
    assert torch.allclose(per_pos.sum(0), summed, rtol=1e-9, atol=1e-12)


def test_integrated_gradients_add_up_to_patching_the_whole_site(setup):
    lm, saes, enc = setup
    errors = {}
    for steps in (4, 32):
        ig = attribute_nodes(lm, enc, saes, method="ig", steps=steps, batch_size=3)
        errors[steps] = {}
        for c in saes:
            exact = exact_site_effect(lm, enc, c.site)
            assert abs(exact) > 1e-6
            errors[steps][c.site] = abs(float(ig.effects[c.site].double().sum()) - exact) / abs(exact)
    for c in saes:
        assert errors[32][c.site] < 2e-3, errors
        # the midpoint rule: 8× the steps, ~64× less error (at least 20×), down to a floor far below any use
        assert errors[32][c.site] < errors[4][c.site] / 20 or errors[32][c.site] < 1e-6, errors
    assert max(errors[4].values()) > 1e-3  # the sites where the model is far from linear


def test_attribution_patching_correlates_with_exact_patching_through_the_model(setup):
    lm, saes, enc = setup
    effects = attribute_nodes(lm, enc, saes, method="atp", batch_size=6)
    site = saes[0].site  # the earliest site: its effects go through all three layers
    nodes = [(site, i) for i in range(saes[0].d_sae + 1)]
    exact = exact_node_effects(lm, enc, saes, nodes, batch_size=6)
    got = effects.effects[site]
    moved = exact.abs() > 0
    assert moved.sum() > 10
    corr = torch.corrcoef(torch.stack([got[moved], exact[moved]]).double())[0, 1]
    assert corr > 0.9, corr


def test_ranked_and_json(setup):
    lm, saes, enc = setup
    effects = attribute_nodes(lm, enc, saes, method="atp", batch_size=6)
    top = effects.ranked(5)
    assert [abs(e) for _, _, e in top] == sorted((abs(e) for _, _, e in top), reverse=True)
    assert abs(top[0][2]) == max(float(v.abs().max()) for v in effects.effects.values())
    assert len(effects.to_json(top=7)["top_nodes"]) == 7


def test_bad_input(setup, tiny_model_dirs):
    lm, saes, enc = setup
    with pytest.raises(SaeforgeError, match="width 16 .* another model"):
        circuit_saes(lm, {"layers.0.mlp_out": _sae(d=16)})
    with pytest.raises(SaeforgeError, match="unknown attribution method"):
        attribute_nodes(lm, enc, saes, method="exact")
    ragged = EncodedTask(enc.task, enc.clean_ids, enc.corrupt_ids, enc.attention_mask.clone(), enc.keep.clone(),
                         enc.last.clone(), enc.clean_answers, enc.corrupt_answers)
    ragged.attention_mask[0, -1] = 0
    with pytest.raises(SaeforgeError, match="same number of tokens"):
        attribute_nodes(lm, ragged, saes, per_position=True)


def test_saes_of_another_model_are_refused(tiny_run, tiny_model_dirs):
    from saeforge.runs import load_run
    from saeforge.models.language_model import LanguageModel

    run = load_run(tiny_run, device="cpu")
    assert circuit_saes(run.lm, run.saes)
    other = LanguageModel.load(str(tiny_model_dirs["mistral"]), device="cpu")  # same widths, other weights
    with pytest.raises(SaeforgeError, match="was trained on model .*fingerprint"):
        circuit_saes(other, load_run(tiny_run, lm=other).saes)


def test_the_fingerprint_check_does_not_depend_on_the_dtype(tiny_run, tiny_model_dirs):
    """SAEs trained with the model in bfloat16 record the bfloat16 fingerprint: the float32 model is accepted; a
    model under the same name with other weights is refused, as is the float32 fingerprint on a bfloat16 model
    (which cannot be recomputed), with a fix that says to load float32."""
    from saeforge.models.language_model import LanguageModel
    from saeforge.runs import load_run

    run = load_run(tiny_run, device="cpu")
    bf16 = LanguageModel.load(str(tiny_model_dirs["llama"]), dtype="bfloat16", device="cpu")
    assert bf16.fingerprint() != run.lm.fingerprint()
    for bound in run.saes.values():
        bound.meta["model_fingerprint"] = bf16.fingerprint()
    assert circuit_saes(run.lm, run.saes)  # float32 model, bfloat16 fingerprint

    other = LanguageModel.load(str(tiny_model_dirs["mistral"]), device="cpu")
    for bound in run.saes.values():
        bound.meta |= {"model_fingerprint": other.fingerprint(torch.bfloat16), "model_name": run.lm.name}
    with pytest.raises(SaeforgeError, match="other weights, whatever the name") as err:
        circuit_saes(run.lm, run.saes)
    assert "load the model the SAEs were trained on" in err.value.fix

    f32 = load_run(tiny_run, device="cpu")  # the float32 fingerprint, the model loaded in bfloat16
    bf16.name = f32.lm.name
    with pytest.raises(SaeforgeError, match="fingerprint") as err:
        circuit_saes(bf16, load_run(tiny_run, lm=bf16).saes)
    assert "float32" in err.value.fix


@pytest.mark.embedded
def test_the_float32_embedded_model_reproduces_its_bfloat16_fingerprint(embedded_lm):
    """Rounding the float32 weights to bfloat16 gives the fingerprint of the model loaded in bfloat16 (what a suite
    trained in bfloat16 records), and nothing coarser collides with the float32 one."""
    import torch

    from saeforge.circuits.attribution import model_fingerprints
    from saeforge.models.language_model import LanguageModel

    bf16 = LanguageModel.load("embedded", dtype="bfloat16", device="cpu")
    prints = model_fingerprints(embedded_lm)
    assert bf16.fingerprint() in prints and bf16.fingerprint() != embedded_lm.fingerprint()
    assert len(prints) == 3 and model_fingerprints(bf16) == {bf16.fingerprint()}
    assert embedded_lm.fingerprint(torch.float32) == embedded_lm.fingerprint()
