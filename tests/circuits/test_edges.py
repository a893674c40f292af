"""Edges against a reference that holds the sites between two nodes at their clean values and differentiates by
central differences (float64, tiny Llama)."""

import pytest
import torch

from saeforge.circuits.attribution import circuit_saes, read_nodes
from saeforge.circuits.edges import attribute_edges
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
