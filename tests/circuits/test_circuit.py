"""Circuit extraction, mean-ablation faithfulness and completeness, the random control, JSON and DOT export."""

import json

import pytest
import torch

from saeforge.circuits.attribution import attribute_nodes, circuit_saes, read_nodes
from saeforge.circuits.circuit import (Circuit, Evaluator, ablated_metric, build_circuit, faithfulness_curve,
                                       node_means, plot_curve, select_nodes, write_circuit)
from saeforge.circuits.edges import attribute_edges
from saeforge.errors import SaeforgeError
from tests.circuits.test_attribution import random_task
from tests.models.test_gradients import _sae, float64_model

SITES = ("layers.0.mlp_out", "layers.1.resid_post", "layers.2.resid_post")


@pytest.fixture(scope="module")
def setup(tiny_model_dirs):
    lm = float64_model(tiny_model_dirs["llama"], "llama")
    saes = circuit_saes(lm, {s: _sae(seed=i) for i, s in enumerate(SITES)})
    enc = random_task(lm, n=8)
    return lm, saes, enc, Evaluator(lm, enc, saes, batch_size=4)


def test_means_are_per_position_means_over_the_corrupt_prompts(setup):
    lm, saes, enc, ev = setup
    values = read_nodes(lm, enc.corrupt_ids, enc.attention_mask, saes).values
    for c in saes:
        f, e = values[c.site]
        assert torch.allclose(ev.means[c.site][0].double(), f.mean(0).double(), atol=1e-6)
        assert torch.allclose(ev.means[c.site][1].double(), e.mean(0).double(), atol=1e-6)


def test_the_two_ends(setup):
    lm, saes, enc, ev = setup
    clean = enc.metric(lm.logits(enc.clean_ids, enc.attention_mask))
    assert ev.m_model == pytest.approx(float(clean.mean()), rel=1e-9)  # keeping every node is the model
    assert ev.faithfulness({c.site: range(c.d_sae + 1) for c in saes}) == pytest.approx(1.0, abs=1e-9)
    assert ev.faithfulness({}) == pytest.approx(0.0, abs=1e-9)
    assert ev.faithfulness({}, complement=True) == pytest.approx(1.0, abs=1e-9)
    # with every node of the last site ablated, the earlier sites no longer matter
    last_ablated = {c.site: torch.ones(c.d_sae + 1, dtype=torch.bool) for c in saes}
    last_ablated[SITES[-1]][:] = False
    assert ablated_metric(lm, enc, saes, last_ablated, ev.means) == pytest.approx(ev.m_empty, rel=1e-9)


def test_ablating_one_feature_is_replacing_it_by_its_mean(setup):
    """The reference: the first site's latent i set to its per-position mean, by hand."""
    lm, saes, enc, ev = setup
    c = saes[0]
    f0, _ = read_nodes(lm, enc.clean_ids, enc.attention_mask, saes).values[c.site]
    i = int((f0 != 0).sum((0, 1)).argmax())
    masks = {s.site: torch.ones(s.d_sae + 1, dtype=torch.bool) for s in saes}
    masks[c.site][i] = False

    def by_hand(x):
        f = c.sae.encode(x)
        e = x - c.sae.decode(f)
        f[..., i] = ev.means[c.site][0][:, i].to(f.dtype)
        return torch.where(enc.keep[..., None], c.sae.decode(f) + e, x)

    with lm.edit({c.site: by_hand}):
        want = float(enc.metric(lm.logits(enc.clean_ids, enc.attention_mask)).mean())
    assert ablated_metric(lm, enc, saes, masks, ev.means) == pytest.approx(want, rel=1e-9)
    # the same, running only the blocks after the cached input of the first site's block
    assert ev.metric(masks) == pytest.approx(want, rel=1e-9)
    assert want != pytest.approx(ev.m_model, rel=1e-6)


def test_extraction_evaluation_and_export(setup, tmp_path):
    lm, saes, enc, ev = setup
    effects = attribute_nodes(lm, enc, saes, method="atp", batch_size=4)
    top = select_nodes(effects, top=12)
    assert sum(len(v) for v in top.values()) == 12
    cut = sorted(abs(e) for _, _, e in effects.ranked(12))[0]
    by_threshold = select_nodes(effects, threshold=cut)
    assert by_threshold == top
    no_errors = select_nodes(effects, top=12, errors=False)
    assert all(c.d_sae not in no_errors[c.site] for c in saes)
    with pytest.raises(SaeforgeError, match="either"):
        select_nodes(effects)

    edges = attribute_edges(lm, enc, saes, top, batch_size=4)
    circuit = build_circuit(effects, top, edges, edge_threshold=0.0, settings={"method": "atp"})
    assert circuit.size == 12
    logit_edges = [e for e in circuit.edges if e["to"][0] == "logits"]
    assert len(logit_edges) == len(top[SITES[-1]])
    strong = build_circuit(effects, top, edges, edge_threshold=float("inf"))
    assert all(e["to"][0] == "logits" for e in strong.edges)

    result = ev.evaluate(top, random_draws=3)
    assert result["nodes"] == 12 and result["features"] == 12 - sum(c.d_sae in top[c.site] for c in saes)
    assert result["faithfulness"] == pytest.approx(ev.faithfulness(top), rel=1e-12)
    assert result["completeness"] == pytest.approx(ev.faithfulness(top, complement=True), rel=1e-12)
    assert result["random_faithfulness_std"] is not None
    g = torch.Generator().manual_seed(1)
    rand = ev.random_like(top, g)
    for c in saes:
        assert len(rand[c.site]) == len(top[c.site])
        assert (c.d_sae in rand[c.site]) == (c.d_sae in top[c.site])
        assert all(i in ev.active[c.site].tolist() for i in rand[c.site] if i != c.d_sae)

    circuit.evaluation = result
    paths = write_circuit(circuit, tmp_path / "c")
    again = Circuit.from_json(json.loads(paths["json"].read_text()))
    assert again.nodes == circuit.nodes and again.edges == circuit.edges
    dot = paths["dot"].read_text()
    assert dot.startswith("digraph") and dot.count("->") == len(circuit.edges)
    with pytest.raises(SaeforgeError, match="not a saeforge circuit"):
        Circuit.from_json({"format": "x"})

    rows = faithfulness_curve(ev, effects, [2, 6], random_draws=2)
    assert [r["top"] for r in rows] == [2, 6]
    assert plot_curve(rows, tmp_path / "curve.png").stat().st_size > 1000


def test_top_nodes_beat_random_ones_on_a_structured_task(setup):
    """With all error nodes kept, the features with the largest effects carry more of the logit difference than
    as many random active features (averaged over many draws)."""
    lm, saes, enc, ev = setup
    effects = attribute_nodes(lm, enc, saes, method="ig", steps=8, batch_size=4)
    nodes = select_nodes(effects, top=6, errors=False)
    for c in saes:
        nodes[c.site] = nodes[c.site] + [c.d_sae]
    result = ev.evaluate(nodes, random_draws=20)
    assert result["faithfulness"] > result["random_faithfulness_mean"] + result["random_faithfulness_std"]


def test_means_cover_ragged_prompts(setup):
    lm, saes, enc, _ = setup
    ragged = enc.rows(slice(0, 4))
    ragged.attention_mask[0, -2:] = 0
    means = node_means(lm, ragged, saes)
    values = read_nodes(lm, ragged.corrupt_ids[1:], ragged.attention_mask[1:], saes).values
    f = values[SITES[0]][0]
    assert torch.allclose(means[SITES[0]][0][-1].double(), f[:, -1].mean(0).double(), atol=1e-6)


def test_skipping_the_blocks_before_the_first_site_changes_nothing(setup):
    lm, saes, enc, _ = setup
    later = saes[1:]  # layers.1.resid_post first: blocks 0 and 1 are skipped
    ev = Evaluator(lm, enc, later, batch_size=4)
    assert all(b.start == 2 for b in ev.blocks.values())
    clean = enc.metric(lm.logits(enc.clean_ids, enc.attention_mask))
    assert ev.m_model == pytest.approx(float(clean.mean()), rel=1e-9)
    masks = {c.site: torch.rand(c.d_sae + 1, generator=torch.Generator().manual_seed(3)) > 0.5 for c in later}
    assert ev.metric(masks) == pytest.approx(ablated_metric(lm, enc, later, masks, ev.means, batch_size=4), rel=1e-9)
