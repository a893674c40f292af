"""CircuitLasso: FISTA against the closed form of an orthogonal design, support recovery, and the circuit read
backwards from the metric on the tiny model."""

import pytest
import torch

from saeforge.circuits.attribution import circuit_saes, read_nodes
from saeforge.circuits.lasso import fista_lasso, lasso_circuit, overlap
from saeforge.errors import SaeforgeError
from tests.circuits.test_attribution import random_task
from tests.models.test_gradients import _sae, float64_model


def test_orthogonal_design_has_the_soft_threshold_solution():
    g = torch.Generator().manual_seed(0)
    m, p, q = 400, 12, 3
    q_mat, _ = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64))
    x = q_mat * m ** 0.5  # xᵀx / M = I
    y = torch.randn(m, q, generator=g, dtype=torch.float64)
    lam = 0.05
    b = x.T @ y / m
    want = torch.sign(b) * (b.abs() - lam).clamp(min=0)
    assert (want == 0).any() and (want != 0).any()
    assert torch.allclose(fista_lasso(x, y, lam), want, atol=1e-10)


def test_support_recovery_and_optimality():
    g = torch.Generator().manual_seed(1)
    m, p, q = 2000, 60, 4
    x = torch.randn(m, p, generator=g, dtype=torch.float64)
    a_true = torch.zeros(p, q, dtype=torch.float64)
    support = torch.randperm(p * q, generator=g)[:10]
    signs = torch.randn(10, generator=g, dtype=torch.float64).sign()
    a_true.view(-1)[support] = signs * (1 + torch.rand(10, generator=g, dtype=torch.float64))
    y = x @ a_true + 0.1 * torch.randn(m, q, generator=g, dtype=torch.float64)
    lam = 0.05
    a = fista_lasso(x, y, lam, iters=5000, tol=1e-12)
    assert torch.equal(a != 0, a_true != 0)
    # the optimality (KKT) conditions of the lasso: |gradient| ≤ lam, = lam with the sign of a on the support
    grad = x.T @ (y - x @ a) / m
    assert float(grad.abs().max()) <= lam + 1e-8
    on = a != 0
    assert torch.allclose(grad[on], lam * a[on].sign(), atol=1e-8)
    with pytest.raises(SaeforgeError, match="≥ 0"):
        fista_lasso(x, y, -1.0)


def test_lasso_circuit_on_the_tiny_model(tiny_model_dirs):
    lm = float64_model(tiny_model_dirs["llama"], "llama")
    sites = ("layers.0.mlp_out", "layers.1.resid_post", "layers.2.resid_post")
    saes = circuit_saes(lm, {s: _sae(seed=i) for i, s in enumerate(sites)})
    enc = random_task(lm, n=16)
    result = lasso_circuit(lm, enc, saes, lam=0.02, lam_metric=0.01)
    clean = read_nodes(lm, enc.clean_ids, enc.attention_mask, saes).values
    corrupt = read_nodes(lm, enc.corrupt_ids, enc.attention_mask, saes).values
    assert result.nodes[sites[-1]] == sorted(result.to_metric)
    assert result.nodes[sites[-1]], "the metric depends on some feature of the last site"
    for c in saes:
        fired = ((clean[c.site][0] != 0) | (corrupt[c.site][0] != 0))[enc.keep].any(0)
        assert all(bool(fired[i]) for i in result.nodes[c.site])  # only active features
    for e in result.edges:  # edges join selected nodes of successive sites
        assert e["from"][1] in result.nodes[e["from"][0]] and e["to"][1] in result.nodes[e["to"][0]]
        assert sites.index(e["to"][0]) == sites.index(e["from"][0]) + 1
    bigger = lasso_circuit(lm, enc, saes, lam=0.002, lam_metric=0.001)
    assert sum(map(len, bigger.nodes.values())) > sum(map(len, result.nodes.values()))
    with_errors = result.with_error_nodes(saes)
    assert all(c.d_sae in with_errors[c.site] for c in saes)
    o = overlap(result.nodes, bigger.nodes)
    assert o["shared"] <= min(o["a"], o["b"]) and 0 <= o["jaccard"] <= 1
    assert overlap(result.nodes, result.nodes)["jaccard"] == 1.0
