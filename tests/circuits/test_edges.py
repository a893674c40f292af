"""Edges against a reference that holds the sites between two nodes at their clean values and differentiates by
central differences (float64, tiny Llama)."""

import pytest
import torch

from saeforge.circuits.attribution import circuit_saes, read_nodes
from saeforge.circuits.edges import attribute_edges
from saeforge.circuits.tasks import EncodedTask
from saeforge.errors import SaeforgeError
from tests.circuits.test_attribution import random_task
from tests.models.test_gradients import _sae, float64_model

SITES = ("layers.0.mlp_out", "layers.1.attn_out", "layers.1.mlp_out", "layers.1.resid_post")
H = 1e-5


@pytest.fixture(scope="module")
def setup(tiny_model_dirs):
    lm = float64_model(tiny_model_dirs["llama"], "llama")
    saes = circuit_saes(lm, {s: _sae(seed=i) for i, s in enumerate(SITES)})
    return lm, saes, random_task(lm, n=3)


def reference_edge(lm, enc, saes, up, i, down, j):
    """−Σ ∇_d m · (d(u + hΔu) − d(u − hΔu)) / 2h with every site between ``up`` and ``down`` held clean."""
    by = {c.site: c for c in saes}
    order = [c.site for c in saes]
    between = order[order.index(up) + 1: order.index(down)]
    ids, mask, keep = enc.clean_ids, enc.attention_mask, enc.keep
    clean = read_nodes(lm, ids, mask, saes).values
    corrupt = read_nodes(lm, enc.corrupt_ids, mask, saes).values
    held = lm.read(ids, between, attention_mask=mask) if between else {}
    out = lm.spliced_forward(ids, {c.site: c.sae for c in saes}, attention_mask=mask)
    g_f, g_e = out.gradients(enc.metric(out.logits).sum())[down]
    c_up, c_down = by[up], by[down]

    def d_value(h):
        (f0, e0), (f1, e1) = clean[up], corrupt[up]
        f, e = f0.clone(), e0.clone()
        if i == c_up.d_sae:
            e = e0 + h * (e1 - e0)
        else:
            f[..., i] = f0[..., i] + h * (f1 - f0)[..., i]
        got = {}
        edits = {up: lambda x: torch.where(keep[..., None], c_up.sae.decode(f) + e, x)}
        for s in between:
            edits[s] = lambda x, s=s: held[s]

        def record(x):
            fd = c_down.sae.encode(x)
            got["v"] = (x - c_down.sae.decode(fd)) if j == c_down.d_sae else fd[..., j]

        edits[down] = record
        with torch.no_grad(), lm.edit(edits):
            lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
        return got["v"]

    deriv = (d_value(H) - d_value(-H)) / (2 * H)
    if j == c_down.d_sae:
        return -float((g_e * deriv * keep[..., None]).sum()) / len(enc)
    return -float((g_f[..., j] * deriv * keep).sum()) / len(enc)


def test_edges_match_direct_derivatives(setup):
    lm, saes, enc = setup
    clean = read_nodes(lm, enc.clean_ids, enc.attention_mask, saes).values
    nodes = {}
    for c in saes:  # three latents active at the last position, and the error node
        active = (clean[c.site][0][:, -1] != 0).any(0).nonzero().flatten()[:3].tolist()
        nodes[c.site] = active + [c.d_sae]
    edges = attribute_edges(lm, enc, saes, nodes, batch_size=2)
    # every later site is reached directly from every earlier one here (no resid_post in between)
    assert set(edges) == {(a, b) for k, a in enumerate(SITES) for b in SITES[k + 1:]}
    checked = []
    for (up, down), w in edges.items():
        assert w.shape == (len(nodes[down]), len(nodes[up]))
        for r, j in enumerate(nodes[down]):
            for col, i in enumerate(nodes[up]):
                if (r + col) % 3:  # a third of the pairs keeps the test short
                    continue
                want = reference_edge(lm, enc, saes, up, i, down, j)
                # float32 results; central differences round at ~1e-16 / H
                assert abs(float(w[r, col]) - want) <= 1e-5 * abs(want) + 1e-10, (up, i, down, j, want, w[r, col])
                checked.append(abs(want))
    assert len(checked) > 20
    assert sorted(checked)[len(checked) // 2] > 1e-8  # most edges far above the absolute tolerance


def test_a_spliced_residual_stream_cuts_the_paths_through_it(tiny_model_dirs):
    lm = float64_model(tiny_model_dirs["llama"], "llama")
    sites = ("layers.0.mlp_out", "layers.0.resid_post", "layers.1.resid_post")
    saes = circuit_saes(lm, {s: _sae(seed=i) for i, s in enumerate(sites)})
    enc = random_task(lm, n=2)
    nodes = {c.site: [0, 1, c.d_sae] for c in saes}
    edges = attribute_edges(lm, enc, saes, nodes)
    assert ("layers.0.mlp_out", "layers.0.resid_post") in edges
    assert ("layers.0.resid_post", "layers.1.resid_post") in edges
    assert ("layers.0.mlp_out", "layers.1.resid_post") not in edges  # only through layers.0.resid_post


def test_per_position_edges_sum_to_the_summed_edges(setup):
    """Per-position edges of the tiny model add up over both positions to the summed edges, vanish from a later
    position to an earlier one (causal attention), are not all on one diagonal, and are exported with positions."""
    from saeforge.circuits.attribution import attribute_nodes
    from saeforge.circuits.circuit import Circuit, build_circuit

    lm, saes, enc = setup
    nodes = {c.site: [0, 3, 5, c.d_sae] for c in saes}
    summed = attribute_edges(lm, enc, saes, nodes, batch_size=2)
    per_position = attribute_edges(lm, enc, saes, nodes, batch_size=2, per_position=True)
    assert set(per_position) == set(summed)
    t = enc.clean_ids.shape[1]
    for key, w in per_position.items():
        assert w.shape == (len(nodes[key[1]]), t, len(nodes[key[0]]), t)
        scale = float(summed[key].abs().max())
        assert scale > 1e-6
        torch.testing.assert_close(w.double().sum((1, 3)), summed[key].double(), rtol=1e-6, atol=1e-9 * scale)
        later_to_earlier = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)  # [q, p]: p > q
        assert float(w.permute(0, 2, 1, 3)[..., later_to_earlier].abs().max()) == 0.0
    # attention moves information between positions: some edges join two different positions
    off = [w.permute(0, 2, 1, 3)[..., torch.tril(torch.ones(t, t, dtype=torch.bool), -1)].abs().max()
           for (u, d), w in per_position.items() if "attn" in d]
    assert max(float(v) for v in off) > 1e-6

    effects = attribute_nodes(lm, enc, saes, method="atp")
    circuit = build_circuit(effects, nodes, per_position, edge_threshold=0.0)
    plain = build_circuit(effects, nodes, summed, edge_threshold=0.0)
    assert len(circuit.edges) == len(plain.edges)
    for a, b in zip(circuit.edges, plain.edges):
        assert a["from"] == b["from"] and a["to"] == b["to"]
        assert abs(a["effect"] - b["effect"]) <= 1e-6 * abs(b["effect"]) + 1e-12
    pos = circuit.to_json()["position_edges"]
    assert pos and all(e["from"][2] <= e["to"][2] < t for e in pos)
    again = Circuit.from_json(circuit.to_json())
    assert again.position_edges == circuit.position_edges
    ragged = EncodedTask(enc.task, enc.clean_ids, enc.corrupt_ids, enc.attention_mask.clone(), enc.keep,
                         enc.last, enc.clean_answers, enc.corrupt_answers)
    ragged.attention_mask[0, -1] = 0
    with pytest.raises(SaeforgeError, match="same number of tokens"):
        attribute_edges(lm, ragged, saes, nodes, per_position=True)
