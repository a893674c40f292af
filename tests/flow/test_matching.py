import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.flow.matching import blocked_topk, compare_saes, match_decoders, pearson_match
from tests.flow.helpers import noisy, unit


def test_top1_finds_a_planted_permutation_exactly():
    g = torch.Generator().manual_seed(1)
    b = unit(3000, 64, g)
    perm = torch.randperm(3000, generator=g)
    a = noisy(b[perm], 0.5, g) * 3.0  # scaled rows: cosine ignores decoder norms
    m = match_decoders(a, b, "top1")
    assert torch.equal(m.top1, perm)
    assert m.s.min() > 0.8


def test_blocking_does_not_change_the_result():
    g = torch.Generator().manual_seed(2)
    a, b = unit(700, 32, g), unit(900, 32, g)
    full = (a @ b.T).topk(7, dim=1)
    v, i = blocked_topk(a, b, 7, block_a=64, block_b=100)
    assert torch.equal(i, full.indices)
    assert torch.allclose(v, full.values)


def test_topk_finds_planted_top_k_structure_and_drops_non_positive_cosines():
    g = torch.Generator().manual_seed(3)
    d = 48
    b = unit(40, d, g)
    # feature i of a is a mix of orthonormal rows b[i], b[i+1], b[i+2] with weights 3, 2, 1, minus a little of every
    # other row, so exactly three cosines are positive
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    b = q[:40]
    a = torch.stack([3 * b[i] + 2 * b[i + 1] + b[i + 2] - 0.05 * (b.sum(0) - b[i:i + 3].sum(0)) for i in range(30)])
    m = match_decoders(a, b, "topk", k=5)
    assert torch.equal(m.indices[:, :3], torch.stack([torch.arange(30) + j for j in range(3)], 1))
    assert (m.indices[:, 3:] == -1).all() and (m.scores[:, 3:] == 0).all()  # 1_{x>0} removes the negative ones
    assert torch.allclose(m.scores[:, 0], torch.full((30,), 3 / (14 + 37 * 0.05 ** 2) ** 0.5), atol=1e-5)


def test_permutation_equals_scipy_and_is_one_to_one():
    linear_sum_assignment = pytest.importorskip("scipy.optimize").linear_sum_assignment  # the dev and flow extras

    g = torch.Generator().manual_seed(4)
    b = unit(300, 16, g)
    a = noisy(b[torch.randperm(300, generator=g)], 2.0, g)  # so noisy that top-1 collides
    m = match_decoders(a, b, "permutation")
    rows, cols = linear_sum_assignment((a @ b.T).double().numpy(), maximize=True)
    assert torch.equal(m.top1, torch.as_tensor(cols))
    assert len(set(m.top1.tolist())) == 300
    top1 = match_decoders(a, b, "top1").top1
    assert len(set(top1.tolist())) < 300  # the planted noise makes top-1 many-to-one: the test is not trivial


def test_permutation_recovers_a_planted_permutation():
    pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(5)
    b = unit(500, 32, g)
    perm = torch.randperm(500, generator=g)
    m = match_decoders(noisy(b[perm], 0.3, g), b, "permutation")
    assert torch.equal(m.top1, perm)


def test_pearson_matches_planted_activation_copies():
    g = torch.Generator().manual_seed(6)
    acts_b = torch.relu(torch.randn(5000, 60, generator=g))
    perm = torch.randperm(60, generator=g)
    acts_a = acts_b[:, perm] * 2 + 0.1 * torch.rand(5000, 60, generator=g)
    acts_a[:, 7] = 0.0  # a dead feature gets no match
    m = pearson_match(acts_a, acts_b)
    expect = perm.clone()
    expect[7] = -1
    assert torch.equal(m.top1, expect)
    assert m.s[7] == 0 and (m.s[torch.arange(60) != 7] > 0.95).all()


def test_widths_must_agree():
    g = torch.Generator().manual_seed(7)
    with pytest.raises(SaeforgeError, match="width"):
        match_decoders(unit(10, 8, g), unit(10, 9, g))


def test_compare_counts_shared_features():
    g = torch.Generator().manual_seed(8)
    a = unit(400, 64, g)
    # b: the first 300 of a's features (slightly moved) and 200 new ones
    b = torch.cat([noisy(a[:300], 0.3, g), unit(200, 64, g)])
    r = compare_saes(a, b, (0.5, 0.9))
    assert r["share_a_matched"]["0.9"] == pytest.approx(0.75)
    assert r["share_b_matched"]["0.9"] == pytest.approx(0.6)
    assert r["mutual_top1"] >= 0.75  # the 300 shared features, plus random pairs that happen to be mutual
