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


def test_streamed_moments_give_the_lasso_of_the_standardised_columns():
    """The Gram form of the standardised problem, accumulated in chunks, equals standardising the stacked codes."""
    from saeforge.circuits.lasso import Moments, _standardise, fista_lasso_gram

    g = torch.Generator().manual_seed(3)
    m = 3000
    up = torch.relu(torch.randn(m, 40, generator=g, dtype=torch.float64))
    down = torch.relu(up[:, :30] @ torch.randn(30, 25, generator=g, dtype=torch.float64) * 0.3
                      + torch.randn(m, 25, generator=g, dtype=torch.float64))
    columns = {"a": torch.arange(0, 40, 2), "b": torch.tensor([1, 4, 7, 9, 20])}
    moments = Moments(columns)
    for start in range(0, m, 700):
        moments.add({"a": up[start:start + 700], "b": down[start:start + 700]})
    assert moments.count == m
    targets = torch.tensor([0, 2, 3])
    gram, cross = moments.standardised("a", "b", targets)
    x = _standardise(up[:, columns["a"]])
    y = _standardise(down[:, columns["b"][targets]])
    torch.testing.assert_close(gram, x.T @ x / m, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cross, x.T @ y / m, rtol=1e-10, atol=1e-12)
    a = fista_lasso_gram(gram, cross, 0.05, iters=3000, tol=1e-12)
    torch.testing.assert_close(a, fista_lasso(x, y, 0.05, iters=3000, tol=1e-12), rtol=1e-8, atol=1e-10)
    assert (a != 0).any() and (a == 0).any()


@pytest.fixture(scope="module")
def cached_setup(tiny_cache, tiny_llama):
    from saeforge.data.activation_cache import ActivationCache

    sites = ("layers.1.resid_post", "layers.2.resid_post")
    torch.manual_seed(0)
    saes = circuit_saes(tiny_llama, {s: _sae(seed=i, dtype=torch.float32) for i, s in enumerate(sites)})
    return tiny_llama, saes, ActivationCache(tiny_cache.folder), random_task(tiny_llama, n=16)


def test_lasso_fits_between_sites_from_a_cache(cached_setup):
    """Fitted from a cache: the moments are those of the cache's codes, the circuit differs from the one fitted on
    the task's prompts only through them, and it exports to JSON and DOT like attribution's."""
    from saeforge.circuits.circuit import Circuit
    from saeforge.circuits.lasso import Moments, cache_batches

    lm, saes, cache, enc = cached_setup
    tokens = 5000
    result = lasso_circuit(lm, enc, saes, lam=0.02, lam_metric=0.01, cache=cache, cache_tokens=tokens)
    assert result.tokens == tokens and result.source == str(cache.folder)
    batches = list(cache_batches(cache, saes, tokens, chunk=1024))
    assert sum(b[saes[0].site].shape[0] for b in batches) == tokens
    x = cache.load(saes[0].site, max_tokens=tokens)
    torch.testing.assert_close(batches[0][saes[0].site], saes[0].sae.encode(x[:1024]))
    assert result.nodes[saes[-1].site] == sorted(result.to_metric)
    on_task = lasso_circuit(lm, enc, saes, lam=0.02, lam_metric=0.01)
    assert on_task.to_metric == result.to_metric  # the metric regression is on the task's prompts in both
    assert on_task.tokens == int(enc.keep.sum()) * 2
    assert result.edges, "some upstream feature predicts a selected downstream one"
    for e in result.edges:
        assert e["from"][1] in result.nodes[e["from"][0]] and e["to"][1] in result.nodes[e["to"][0]]

    circuit = result.to_circuit(saes, "random")
    data = circuit.to_json()
    again = Circuit.from_json(data)
    assert again.nodes == {s: sorted(v) for s, v in result.nodes.items()}
    assert len(data["edges"]) == len(result.edges) + len(result.to_metric)
    effect = dict(zip(circuit.nodes[saes[0].site], circuit.node_effects[saes[0].site]))
    for i in circuit.nodes[saes[0].site]:  # total effect = Σ coefficient × the downstream node's coefficient for y
        want = sum(e["coefficient"] * result.to_metric[e["to"][1]] for e in result.edges if e["from"][1] == i)
        assert effect[i] == pytest.approx(want, rel=1e-12)
    assert circuit.to_dot().startswith("digraph") and "logits" in circuit.to_dot()


def test_a_cache_of_other_sites_or_another_model_is_refused(cached_setup, tiny_model_dirs):
    from saeforge.models.language_model import LanguageModel

    lm, saes, cache, enc = cached_setup
    other_sites = circuit_saes(lm, {"layers.0.resid_post": _sae(seed=5, dtype=torch.float32),
                                    saes[1].site: saes[1].sae})
    with pytest.raises(SaeforgeError, match="lacks the site.*layers.0.resid_post"):
        lasso_circuit(lm, enc, other_sites, cache=cache)
    other = LanguageModel.load(str(tiny_model_dirs["mistral"]), device="cpu")
    with pytest.raises(SaeforgeError, match="holds activations of .* not of"):
        lasso_circuit(other, enc, circuit_saes(other, {c.site: c.sae for c in saes}), cache=cache)
