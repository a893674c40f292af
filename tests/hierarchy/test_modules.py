"""Co-activation modules on the tiny Llama with SAEs at two adjacent layers: graph rules, the latent edits,
success counting, and refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.hierarchy.modules import (COUNTRIES, ModuleFinder, ModuleSettings, Task, _edits, ablation_success,
                                        pearson_edges, swap_success)
from tests.conftest import TRAIN_SITES

PROMPTS = ["To be, or not to be, that is the question", "Now is the winter of our discontent",
           "All the world's a stage, and all the men", "whether 'tis nobler in the mind to suffer"]


@pytest.fixture(scope="module")
def layered_run(tiny_cache, tmp_path_factory):
    """TopK SAEs at layers 1 and 2 of the tiny Llama (adjacent layers)."""
    from saeforge.training import TrainConfig, train

    run = tmp_path_factory.mktemp("modules") / "run"
    train(TrainConfig(out=str(run), cache=str(tiny_cache.folder), sites=TRAIN_SITES, tokens=256 * 20,
                      batch_size=256, d_sae=64, k=4, progress=False, device="cpu", lr_warmup_steps=2,
                      checkpoint_every=100))
    return run


def test_pearson_edges_match_numpy():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(30, 5, generator=g)
    b = torch.cat([a[:, :2] * 3 + 0.01 * torch.rand(30, 2, generator=g), torch.rand(30, 3, generator=g),
                   torch.zeros(30, 1)], 1)
    r = np.corrcoef(a.T.numpy(), b.T.numpy())[:5, 5:]
    expected = {(i, j) for i in range(5) for j in range(5) if r[i, j] > 0.9}
    got = pearson_edges(a, b, 0.9)
    assert {(i, j) for i, j, _ in got} == expected and {(0, 0), (1, 1)} <= expected
    assert all(abs(v - r[i, j]) < 1e-9 for i, j, v in got)  # the constant column links to nothing


def test_graph_nodes_and_edges_follow_the_rules(layered_run):
    finder = ModuleFinder.from_run(layered_run, settings=ModuleSettings(min_correlation=0.5, max_density=1.0,
                                                                        top_k=3), device="cpu")
    assert finder.layers == [1, 2]
    g = finder.graph(PROMPTS)
    acts, _ = finder.runner.latents(PROMPTS)
    for layer in (1, 2):
        top = acts[layer].topk(3, dim=1)
        allowed = set(torch.unique(top.indices[top.values > 0]).tolist())
        assert {i for (lv, i) in g.nodes if lv == layer} <= allowed
    for (la, i), (lb, j), data in g.edges(data=True):
        assert {la, lb} == {1, 2}
        a, b = (acts[la][:, i], acts[lb][:, j])
        r = float(np.corrcoef(a.numpy(), b.numpy())[0, 1])
        assert r > 0.5 and data["r"] == pytest.approx(r, abs=1e-9)
    assert all(g.degree(n) > 0 for n in g.nodes)  # isolated nodes are dropped
    # dense features are left out
    strict = ModuleFinder.from_run(layered_run, settings=ModuleSettings(min_correlation=0.5, max_density=1e-9),
                                   device="cpu")
    assert strict.graph(PROMPTS).number_of_nodes() == 0


def test_ablation_edit_removes_exactly_the_module_latents(layered_run):
    finder = ModuleFinder.from_run(layered_run, device="cpu")
    runner = finder.runner
    b = runner.batch(PROMPTS[:2])
    lm, sae, site = runner.lm, runner.saes[1], runner.sites[1]
    with lm.record([site]) as clean:
        lm.logits(b.input_ids, b.attention_mask)
    module = [(1, 3), (1, 7)]
    fns = {site: e.edit_fn(sae, b.keep) for layer, e in _edits(zero=module).items()}
    with lm.edit(fns), lm.record([site]) as edited:
        lm.logits(b.input_ids, b.attention_mask)
    x = clean[site]
    f = sae.encode(x[b.keep].float())
    expected = x.clone()
    expected[b.keep] -= f[:, [3, 7]] @ sae.W_dec[[3, 7]]
    torch.testing.assert_close(edited[site], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(edited[site][~b.keep], x[~b.keep])  # BOS untouched


def _echo_task(finder) -> Task:
    """A task whose answers are what the model already says (answers that are a space and a word)."""
    from saeforge.hierarchy.modules import answer_token
    from tests.conftest import TEXT

    tok = finder.runner.lm.tokenizer
    words = TEXT.split()
    candidates = sorted({" ".join(words[i:i + n]) for n in (3, 4, 5, 6, 7) for i in range(len(words) - n)})
    top = finder.runner.last_logits(candidates).argmax(-1).tolist()
    answers = {}
    for prompt, t in zip(candidates, top):
        text = tok.decode([t])
        if text.startswith(" ") and text.strip() and answer_token(tok, text.strip()) == t:
            answers[prompt] = {"r": text.strip()}
    assert len(answers) >= 2
    return Task("t", {"r": {"discovery": ["{concept}"], "evaluation": ["{concept}"]}}, answers)


def test_success_counts_on_answers_the_model_gives(layered_run):
    from saeforge.hierarchy.modules import answer_token

    finder = ModuleFinder.from_run(layered_run, device="cpu")
    tok = finder.runner.lm.tokenizer
    task = _echo_task(finder)
    pairs = [(c, "r") for c in task.concepts]
    assert ablation_success(finder, task, [], pairs) == (0, len(pairs))  # nothing ablated, nothing changes
    every = [(layer, i) for layer in (1, 2) for i in range(64)]
    hits, trials = ablation_success(finder, task, every, pairs)
    assert trials == len(pairs) and 0 <= hits <= trials
    prompts = list(task.concepts)
    expected = answer_token(tok, task.answer(prompts[0], "r"))
    assert swap_success(finder, prompts[:1], [], [], {}, 2.0, expected) == [True]  # nothing swapped: same answer


def test_modules_over_saes_of_different_models_are_refused(layered_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(layered_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    cfg_path = run / "saes" / TRAIN_SITES[1] / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["metadata"]["model_fingerprint"] = "another-model"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(SaeforgeError, match="different models") as err:
        ModuleFinder.from_run(run, device="cpu")
    assert "one model" in err.value.fix


def test_bad_tasks_and_settings_are_refused():
    with pytest.raises(SaeforgeError, match="must contain"):
        Task.from_dict({"relations": {"r": {"discovery": ["no slot"], "evaluation": ["{concept}"]}},
                       "concepts": {"a": {"r": "x"}, "b": {"r": "y"}}})
    with pytest.raises(SaeforgeError, match="malformed"):
        Task.from_dict({"relations": []})
    with pytest.raises(SaeforgeError, match="two concepts"):
        Task.from_dict({"relations": {"r": {"discovery": ["{concept}"], "evaluation": ["{concept}"]}},
                       "concepts": {"a": {"r": "x"}}})
    assert len(Task.from_dict(COUNTRIES).concepts) == 20
    with pytest.raises(SaeforgeError, match="correlation"):
        ModuleSettings(min_correlation=1.5).check()
    with pytest.raises(SaeforgeError, match="density"):
        ModuleSettings(max_density=0).check()


def test_best_single_feature_is_the_one_whose_ablation_costs_the_answers_most(layered_run):
    from saeforge.hierarchy.modules import _answer_logprob, answer_token, best_single_feature

    finder = ModuleFinder.from_run(layered_run, device="cpu")
    task = _echo_task(finder)
    tok = finder.runner.lm.tokenizer
    pairs = [(c, "r") for c in list(task.concepts)[:3]]
    module = [(layer, i) for layer in (1, 2) for i in range(0, 64, 6)]
    sets = [(task.prompts(c, r, "discovery"), answer_token(tok, task.answer(c, r))) for c, r in pairs]

    def cost(feature) -> float:
        return sum(_answer_logprob(finder, p, t) - _answer_logprob(finder, p, t, _edits(zero=[feature]))
                   for p, t in sets)

    costs = {f: cost(f) for f in module}
    assert len({round(v, 6) for v in costs.values()}) > 3  # the features differ: the choice means something
    assert best_single_feature(finder, task, module, pairs) == max(costs, key=costs.get)
    # among the 4 most active features only
    peak = finder.max_activations([p for prompts, _ in sets for p in prompts], module)
    allowed = sorted(module, key=lambda f: -peak[f])[:4]
    assert best_single_feature(finder, task, module, pairs, candidates=4) == max(allowed, key=costs.get)
    assert best_single_feature(finder, task, [], pairs) is None
