"""The compiled per-row top-k (saeforge.kernels.native) against torch.topk, and the PyTorch fallback when it is off.

Inputs are drawn from a fresh seed on every run (the seed is in the assertion messages; replay with
SAEFORGE_TEST_SEED=<seed>)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from saeforge.kernels import encode_topk, native

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the PyTorch path is used")


@pytest.fixture
def seed():
    s = int(os.environ.get("SAEFORGE_TEST_SEED", torch.seed() % 2**31))
    torch.manual_seed(s)
    return s


def _check_topk(pre: torch.Tensor, k: int, msg: str) -> tuple[torch.Tensor, torch.Tensor]:
    found = native.topk_rows(pre, k)
    assert found is not None, msg
    vals, idx = found
    assert vals.dtype == pre.dtype and idx.dtype == torch.int64 and vals.shape == idx.shape == (pre.shape[0], k)
    assert torch.equal(pre.gather(1, idx), vals), msg  # the values are those of the listed columns
    assert bool((idx.diff(dim=1) > 0).all()), f"columns distinct and ascending per row ({msg})"
    ref = pre.topk(k, dim=1).values  # the same multiset of values as torch.topk
    assert torch.equal(vals.sort(1, descending=True).values, ref), msg
    # the very columns: every value above the k-th, then the earliest columns equal to it (the kernel's tie rule;
    # torch.topk may keep other tied columns, and continuous random data does tie now and then)
    kth = ref[:, -1:]
    equal = pre == kth
    need = k - (pre > kth).sum(1, keepdim=True)
    expected = ((pre > kth) | (equal & (equal.cumsum(1) <= need))).nonzero()[:, 1].view(-1, k)
    assert torch.equal(idx, expected), msg
    return vals, idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [4608, 1000, 513])  # a multiple of 16, and ragged last groups
@pytest.mark.parametrize("k", [1, 7, 32])
def test_native_topk_matches_torch_topk(dtype, m, k, seed):
    if 16 * k > m + 15:
        pytest.skip("k above one per group of 16")
    pre = (torch.randn(777, m) * torch.rand(777, 1) * 3 + torch.randn(777, 1)).to(dtype)
    _check_topk(pre, k, f"seed {seed}")


@pytest.mark.parametrize("data", ["ties", "constant_rows", "one_spike", "increasing"])
def test_native_topk_ties_and_adversarial_rows(data, seed):
    n, m, k = 300, 2048, 24
    if data == "ties":
        pre = torch.randint(-3, 4, (n, m)).float()
    elif data == "constant_rows":
        pre = torch.randn(n, 1).expand(n, m).contiguous()
    elif data == "one_spike":  # one huge value per row, the rest tiny: the threshold comes from the group maxima
        pre = torch.randn(n, m) * 1e-3
        pre[torch.arange(n), torch.randint(0, m, (n,))] = 1e3
    else:  # every later column larger: the worst case for a running threshold
        pre = torch.arange(m).float().expand(n, m).contiguous() + torch.randn(n, 1)
    vals, idx = _check_topk(pre, k, f"{data}, seed {seed}")
    if data == "constant_rows":  # among equal values the earliest columns are kept
        assert torch.equal(idx, torch.arange(k).expand(n, k)), f"seed {seed}"


def test_native_topk_declines_nan_rows_and_other_inputs():
    pre = torch.randn(64, 512)
    pre[5, 17] = float("nan")
    assert native.topk_rows(pre, 8) is None  # the caller's PyTorch path decides what NaN means
    assert native.topk_rows(torch.randn(8, 64, dtype=torch.float64), 2) is None
    assert native.topk_rows(torch.randn(64, 8).t(), 2) is None  # not contiguous
    assert native.topk_rows(torch.randn(8, 64), 8) is None  # k above one per group of 16


def test_encode_topk_same_with_and_without_the_native_kernel(monkeypatch, seed):
    """The training selection through the compiled kernel equals the PyTorch path's (values and latents)."""
    n, d, m, k = 1024, 64, 2048, 32
    x = torch.randn(n, d)
    W = torch.randn(d, m) / d**0.5
    b = 0.1 * torch.randn(m)
    for matmul_dtype in (None, torch.bfloat16):
        with_native, _ = encode_topk(x, W, b, k=k, matmul_dtype=matmul_dtype)
        monkeypatch.setattr(native, "_lib", False)
        without, _ = encode_topk(x, W, b, k=k, matmul_dtype=matmul_dtype)
        monkeypatch.undo()
        assert torch.equal(with_native.rows, without.rows)
        if matmul_dtype is None:  # float32: no ties, the same columns
            assert torch.equal(with_native.cols, without.cols), f"seed {seed}"
        assert torch.equal(with_native.values.view(n, k).sort(1).values, without.values.view(n, k).sort(1).values)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_runs_the_kernel_after_the_parent_did():
    """The parent's OpenMP pool does not survive fork: the child runs the kernel on one thread instead of waiting
    forever on it."""
    torch.set_num_threads(2)
    pre = torch.randn(512, 1024)
    expected = native.topk_rows(pre, 16)  # the parent's pool now exists
    assert expected is not None
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's exit code is the assertion
        # only the kernel and small element-wise checks here: OpenMP-parallel torch ops can hang in a forked child
        found = native.topk_rows(pre, 16)
        ok = found is not None and torch.equal(found[1], expected[1]) and torch.equal(found[0], expected[0])
        os._exit(0 if ok else 3)
    deadline, status = 60.0, None
    start = time.monotonic()
    while time.monotonic() - start < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's top-k did not finish in 60 s (it waited on the parent's thread pool)")
    assert os.waitstatus_to_exitcode(status) == 0


# ---- the compiled backward (native_backward.c) ----------------------------------------------------------------
# Error bounds from the kernels' summation order (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1):
# a float32 sum in which every term takes part in at most t roundings is within gamma(t) * sum|terms| of the exact
# sum, gamma(t) = t u / (1 - t u), u = 2^-24. A dot product of length d: one rounding per product, ceil(d / 16)
# per lane, 4 in the pairwise sum of the 16 lanes. A column's sum over c entries: one per product, c additions.


def _gamma(t) -> torch.Tensor:
    u = 2.0**-24
    t = torch.as_tensor(t, dtype=torch.float64)
    return t * u / (1 - t * u)


def _pattern(n: int, m: int, k: int):
    pre = torch.randn(n, m)
    vals, idx = pre.topk(k, dim=1)
    idx, order = idx.sort(dim=1)
    rows = torch.arange(n).repeat_interleave(k)
    return rows, idx.reshape(-1), vals.gather(1, order).reshape(-1).relu()


@pytest.mark.parametrize("m", [4608, 1000, 37])
def test_csc_order_is_the_stable_sort_by_column(m, seed):
    rows, cols, _ = _pattern(300, m, min(24, m))
    col_start, perm = native.csc_order(cols, m)
    assert torch.equal(perm, cols.sort(stable=True).indices), f"seed {seed}"
    counts = torch.bincount(cols, minlength=m)
    assert torch.equal(col_start, torch.cat([counts.new_zeros(1), counts.cumsum(0)])), f"seed {seed}"
    assert native.csc_order(torch.tensor([0, m]), m) is None  # a column out of range


@pytest.mark.parametrize("d", [576, 100, 7])  # a multiple of 16, and ragged lane tails
def test_decode_backward_within_the_bound_of_its_summation_order(d, seed):
    n, m, k = 700, 1000, 16
    rows, cols, values = _pattern(n, m, k)
    g, W_dec = torch.randn(n, d), torch.randn(m, d)
    dv, dW = native.decode_backward(g, W_dec, values, rows, native.csc_order(cols, m), dv=True, dW=True)
    g64, W64, v64 = g.double(), W_dec.double(), values.double()
    terms = g64[rows] * W64[cols]  # [nnz, d]
    exact_dv = terms.sum(1)
    assert bool(((dv.double() - exact_dv).abs() <= _gamma(-(-d // 16) + 5) * terms.abs().sum(1)).all()), f"seed {seed}"
    contrib = v64[:, None] * g64[rows]
    exact_dW = torch.zeros(m, d, dtype=torch.float64).index_add_(0, cols, contrib)
    mag = torch.zeros(m, d, dtype=torch.float64).index_add_(0, cols, contrib.abs())
    per_col = torch.bincount(cols, minlength=m).double()[:, None]
    assert bool(((dW.double() - exact_dW).abs() <= _gamma(per_col + 1) * mag).all()), f"seed {seed}"
    assert bool((dW[per_col.squeeze(1) == 0] == 0).all())  # unused latents: zero rows, written
    only_dv, none_dW = native.decode_backward(g, W_dec, values, rows, native.csc_order(cols, m), dv=True, dW=False)
    assert none_dW is None and torch.equal(only_dv, dv)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [4608, 1000, 37])  # whole tiles of 16 latents, and a narrow last tile
def test_encode_backward_within_the_bound_of_its_summation_order(x_dtype, m, seed):
    n, d, k = 700, 96, min(16, m)
    rows, cols, _ = _pattern(n, m, k)
    x, gp = torch.randn(n, d).to(x_dtype), torch.randn(rows.numel())
    dW, db = native.encode_backward(x, gp, rows, native.csc_order(cols, m), m, db=True)
    assert dW.shape == (d, m) and dW.is_contiguous() and dW.dtype == torch.float32
    contrib = gp.double()[:, None] * x.double()[rows]  # bfloat16 x widens exactly
    exact = torch.zeros(m, d, dtype=torch.float64).index_add_(0, cols, contrib)
    mag = torch.zeros(m, d, dtype=torch.float64).index_add_(0, cols, contrib.abs())
    per_col = torch.bincount(cols, minlength=m).double()
    assert bool(((dW.t().double() - exact).abs() <= _gamma(per_col[:, None] + 1) * mag).all()), f"seed {seed}"
    # db adds each column's entries in row order from 0, as index_add_ does: the same float32 sums
    assert torch.equal(db, torch.zeros(m).index_add_(0, cols, gp)), f"seed {seed}"
    assert native.encode_backward(x, gp, rows, native.csc_order(cols, m), m, db=False)[1] is None


def test_backward_kernels_write_into_a_given_output():
    """``out_dW``: the same bits as a fresh result, in the given tensor (every entry overwritten); a tensor of
    another shape, dtype or layout is refused."""
    n, m, d = 300, 512, 48
    rows, cols, values = _pattern(n, m, 8)
    order = native.csc_order(cols, m)
    g, W_dec, x = torch.randn(n, d), torch.randn(m, d), torch.randn(n, d)
    out = torch.full((m, d), float("nan"))
    dv, dW = native.decode_backward(g, W_dec, values, rows, order, dv=True, dW=True, out_dW=out)
    assert dW.data_ptr() == out.data_ptr()
    assert torch.equal(dW, native.decode_backward(g, W_dec, values, rows, order, dv=True, dW=True)[1])
    out = torch.full((d, m), float("nan"))
    dW, db = native.encode_backward(x, values, rows, order, m, db=True, out_dW=out)
    assert dW.data_ptr() == out.data_ptr()
    assert torch.equal(dW, native.encode_backward(x, values, rows, order, m, db=True)[0])
    for bad in (torch.empty(m, d), torch.empty(d, m).double(), torch.empty(m, d).t()):
        with pytest.raises(ValueError, match="out must be"):
            native.encode_backward(x, values, rows, order, m, db=True, out_dW=bad)
    with pytest.raises(ValueError, match="out must be"):
        native.decode_backward(g, W_dec, values, rows, order, dv=True, dW=True, out_dW=torch.empty(d, m))


def test_backward_kernels_decline_what_they_do_not_handle():
    rows, cols, values = _pattern(64, 256, 4)
    order = native.csc_order(cols, 256)
    g, W = torch.randn(64, 32), torch.randn(256, 32)
    assert native.decode_backward(g.double(), W.double(), values.double(), rows, order, dv=True, dW=True) is None
    assert native.decode_backward(g, torch.randn(32, 256).t(), values, rows, order, dv=True, dW=True) is None
    assert native.encode_backward(torch.randn(64, 32).half(), values, rows, order, 256, db=True) is None
    assert native.encode_backward(torch.randn(32, 64).t(), values, rows, order, 256, db=True) is None


@pytest.mark.parametrize("matmul_dtype", [None, torch.bfloat16])
def test_sae_gradients_through_the_compiled_backward_match_the_pytorch_backward(monkeypatch, matmul_dtype, seed):
    """The same forward (same selection, same x_hat, same upstream gradient), the backward once through the
    compiled kernels and once through the PyTorch ops. Both are float32 sums of the same terms in different orders,
    so each is within gamma(t) * sum|terms| of the exact value: they differ by at most twice that (t: the longest
    chain, here a latent's entries + 1, or d + 1 for the sampled dot products feeding W_enc's gradient)."""
    from saeforge.kernels import decode_sparse

    n, d, m, k = 512, 64, 1024, 16
    x = torch.randn(n, d)
    params = [(torch.randn(d, m) / 8).requires_grad_(), (0.1 * torch.randn(m)).requires_grad_(),
              torch.randn(m, d).requires_grad_(), torch.randn(d).requires_grad_()]

    def grads():
        for p in params:
            p.grad = None
        lat, _ = encode_topk(x, params[0], params[1], k=k, matmul_dtype=matmul_dtype, b_pre=params[3])
        ((decode_sparse(lat, params[2]) - x) ** 2).sum().backward()
        return lat, [p.grad.clone() for p in params]

    lat, fast = grads()
    monkeypatch.setattr(native, "csc_order", lambda *a: None)  # the PyTorch backward, the same native top-k
    lat2, slow = grads()
    assert torch.equal(lat.cols, lat2.cols) and torch.equal(lat.values, lat2.values)
    # W_dec's gradient: g = 2 (x_hat - x) is the same in both; sum over a latent's entries of values * g rows
    g = 2 * (decode_sparse(lat, params[2].detach()) - x).detach().double()
    mag = torch.zeros(m, d, dtype=torch.float64).index_add_(0, lat.cols, (lat.values.detach().double()[:, None] * g[lat.rows]).abs())
    per_col = torch.bincount(lat.cols, minlength=m).double()[:, None]
    assert bool(((fast[2] - slow[2]).double().abs() <= 2 * _gamma(per_col + 1) * mag).all()), f"seed {seed}"
    for a, b in zip(fast, slow):
        assert a.is_contiguous() and a.shape == b.shape
    # the encoder's gradients: same terms, same rounding of the sampled dot products up to their own bound; held
    # to a bound of the same form with the dot-product error folded in (gamma(d + per_col + 2))
    xm = (x - params[3].detach()).to(matmul_dtype or torch.float32).double()
    dots = (g[lat.rows] * params[2].detach().double()[lat.cols]).abs().sum(1) * (lat.values.detach() > 0).double()
    mag_enc = torch.zeros(m, d, dtype=torch.float64).index_add_(0, lat.cols, dots[:, None] * xm[lat.rows].abs())
    bound = 2 * _gamma(per_col + d + 2) * mag_enc
    assert bool(((fast[0].t() - slow[0].t()).double().abs() <= bound).all()), f"seed {seed}"


def test_project_rows_within_the_bound_of_its_summation_order(seed):
    """g_r -= (g_r . W_r) / |W_r|^2 W_r: c's error is at most gamma(t + 2) (sum|g W| + |g . W|) / |W|^2 (two dot
    products of t roundings each, one division), then a product and a subtraction (gamma(2) of their sizes)."""
    m, d = 777, 576
    W, g = torch.randn(m, d) * torch.rand(m, 1), torch.randn(m, d)
    W[3] = 0  # an all-zero row: the clamp leaves its gradient as it is
    out = g.clone()
    assert native.project_rows_(out, W)
    W64, g64 = W.double(), g.double()
    n2 = (W64 * W64).sum(1, keepdim=True)
    c = (g64 * W64).sum(1, keepdim=True) / n2.clamp_min(1e-24)
    exact = g64 - c * W64
    t = -(-d // 16) + 4
    c_err = _gamma(t + 2) * 2 * (g64 * W64).abs().sum(1, keepdim=True) / n2.clamp_min(1e-24) \
        + _gamma(t + 2) * c.abs() * 2  # the relative error of |W|^2 passed on to c
    bound = c_err * W64.abs() + _gamma(2) * ((c * W64).abs() + exact.abs() + g64.abs())
    assert bool(((out.double() - exact).abs() <= bound).all()), f"seed {seed}"
    assert torch.equal(out[3], g[3])
    assert not native.project_rows_(g.double(), W.double()) and not native.project_rows_(g, W.t())


def test_project_rows_gives_the_same_bits_on_any_number_of_threads(seed):
    """Each row is reduced by one thread in a fixed order: 1, 2 and 3 threads (and a forked child's one) agree bit
    for bit, so data-parallel ranks and one process project alike."""
    W, g = torch.randn(1000, 576), torch.randn(1000, 576)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = g.clone()
            assert native.project_rows_(out, W)
            outs.append(out)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:]), f"seed {seed}"


def test_matvec_bf16_within_the_bound_of_its_summation_order(seed):
    d, m = 96, 4608
    W, v = torch.randn(d, m).bfloat16(), torch.randn(m)
    out = native.matvec_bf16(W, v)
    terms = W.double() * v.double()  # bfloat16 widens exactly
    assert bool(((out.double() - terms.sum(1)).abs() <= _gamma(-(-m // 16) + 5) * terms.abs().sum(1)).all()), \
        f"seed {seed}"
    assert native.matvec_bf16(W.float(), v) is None and native.matvec_bf16(W, v.double()) is None
