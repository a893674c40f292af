"""Fast sparse TopK kernels against the plain-PyTorch reference, plus selection properties and edge cases.

Inputs are large random tensors drawn from a fresh seed on every run (the seed is in every assertion message so a
failure can be replayed with SAEFORGE_TEST_SEED=<seed>).

Tolerances (float32). The two paths compute the same sums of products in different orders: the reference through
dense GEMMs (blocked, summing also the exact zeros of the masked latents), the fast path through per-row /
per-latent bags of only the selected entries. float32 has eps = 2^-23 ≈ 1.2e-7; a sum of n terms reordered moves by
about sqrt(n)·eps·|terms| typically (n·eps in the worst case). With n ≤ a few thousand (N rows for the weight
gradients, k + aux_k for the rest) that is ~1e-6 relative to the tensor's scale, and what we observe is 1e-7..5e-7.
We assert max|fast − ref| ≤ 2e-5·max|ref| (elementwise, relative to the tensor's largest entry, so that entries
that cancel to ~0 are not held to a relative bound they cannot meet) and ||fast − ref|| ≤ 2e-6·||ref||. A real
bug — one entry missing or extra, a wrong mask, a wrong index — moves some entry by a whole term, i.e. by
≥ ~1/sqrt(n) ≈ 1e-2 of the scale, three orders of magnitude above these bounds.

bfloat16 GEMM: both paths run the very same bfloat16 ``addmm`` forward, so the latents are bit-identical and the
loss agrees to float32 precision. Their backward passes differ by design: the reference is autograd through
bfloat16 casts (the incoming gradient is rounded to bfloat16 and the weight-gradient GEMM's output too, as
autocast does), the fast path keeps the gradients in float32. bfloat16's unit roundoff is u = 2^-9 ≈ 2e-3, two such
roundings give ~2u ≈ 4e-3 relative to the scale typically; we assert max ≤ 8u·max|ref| ≈ 1.6e-2 and
norm ≤ 2u ≈ 4e-3 for W_enc, b_enc, x; the decoder path is float32 in both and keeps the float32 bounds.
"""

from __future__ import annotations

import os

import pytest
import torch

from saeforge.kernels import SparseLatents, decode_sparse, decode_sparse_blocks, encode_topk

F32_MAX, F32_NORM = 2e-5, 2e-6
BF16_U = 2.0**-9
BF16_MAX, BF16_NORM = 8 * BF16_U, 2 * BF16_U

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def seed():
    s = int(os.environ.get("SAEFORGE_TEST_SEED", torch.seed() % 2**31))
    torch.manual_seed(s)
    return s


def _problem(n, d, m, *, device="cpu", dtype=torch.float32, dead_frac=0.0, x_grad=False, bias_shift=0.0):
    """A TopK-SAE-like problem: correlated inputs with a mean offset, encoder/decoder with tied-transpose init."""
    x = torch.randn(n, d, device=device, dtype=dtype) + 0.5 * torch.randn(d, device=device, dtype=dtype)
    W_enc = torch.randn(d, m, device=device, dtype=dtype) / d**0.5
    b_enc = 0.1 * torch.randn(m, device=device, dtype=dtype) + bias_shift
    W_dec = (W_enc.t() + 0.05 * torch.randn(m, d, device=device, dtype=dtype)).contiguous()
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    b_dec = 0.1 * torch.randn(d, device=device, dtype=dtype)
    mask = (torch.rand(m, device=device) < dead_frac) if dead_frac > 0 else None
    return dict(x=x.requires_grad_(x_grad), W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, aux_mask=mask)


def _run(p, impl, *, k, batch=False, aux_k=0, matmul_dtype=None, aux_mask="from_problem", b_pre=False):
    """One SAE loss (reconstruction MSE + 1/32 AuxK NMSE-like term) and its gradients, for a given impl.

    With ``b_pre`` the decoder bias is also the tied pre-encoder bias (passed as ``b_pre``) and gets a gradient."""
    x = p["x"].detach().clone().requires_grad_(p["x"].requires_grad)
    W_enc, b_enc, W_dec = (p[n].detach().clone().requires_grad_() for n in ("W_enc", "b_enc", "W_dec"))
    b_dec = p["b_dec"].detach().clone().requires_grad_(b_pre)
    mask = p["aux_mask"] if aux_mask == "from_problem" else aux_mask
    lat, aux = encode_topk(x, W_enc, b_enc, k=k, batch=batch, aux_k=aux_k, aux_mask=mask,
                           matmul_dtype=matmul_dtype, impl=impl, b_pre=b_dec if b_pre else None)
    x_hat = decode_sparse(lat, W_dec, impl=impl) + b_dec
    err = x - x_hat
    loss = err.pow(2).sum(1).mean()
    if aux is not None:
        aux_hat = decode_sparse(aux, W_dec, impl=impl)
        loss = loss + (aux_hat - err.detach()).pow(2).sum(1).mean() / 32
    loss.backward()
    grads = {"W_enc": W_enc.grad, "b_enc": b_enc.grad, "W_dec": W_dec.grad}
    if x.requires_grad:
        grads["x"] = x.grad
    if b_pre:
        grads["b_pre"] = b_dec.grad
    return lat, aux, loss.detach(), grads


def _close(a, b, max_rel, norm_rel, what):
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    nrm = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    assert diff <= max_rel * scale and nrm <= norm_rel, f"{what}: max diff {diff:.3g} (scale {scale:.3g}), norm rel {nrm:.3g}"


def _same_latents(a: SparseLatents, b: SparseLatents, what):
    assert a.shape == b.shape, what
    assert torch.equal(a.rows, b.rows) and torch.equal(a.cols, b.cols), f"{what}: different selection"
    assert torch.equal(a.values.detach(), b.values.detach()), f"{what}: different values"


def _canonical(lat: SparseLatents):
    n, m = lat.shape
    assert lat.rows.dtype == torch.int64 and lat.cols.dtype == torch.int64
    assert lat.values.shape == lat.rows.shape == lat.cols.shape
    if lat.rows.numel():
        key = lat.rows * m + lat.cols
        assert bool((key[1:] > key[:-1]).all()), "rows ascending, cols ascending within a row, no duplicates"
        assert 0 <= int(lat.rows.min()) and int(lat.rows.max()) < n and 0 <= int(lat.cols.min()) and int(lat.cols.max()) < m
    assert bool((lat.values >= 0).all())


CASES = [
    pytest.param(dict(batch=False), id="topk"),
    pytest.param(dict(batch=True), id="batchtopk"),
    pytest.param(dict(batch=False, aux_k=48, dead_frac=0.3), id="topk-aux"),
    pytest.param(dict(batch=True, aux_k=48, dead_frac=0.3), id="batchtopk-aux"),
    pytest.param(dict(batch=False, aux_k=64, dead_frac=0.01), id="topk-aux-fewer-dead-than-aux_k"),
    pytest.param(dict(batch=False, x_grad=True, aux_k=32, dead_frac=0.2), id="topk-aux-xgrad"),
    pytest.param(dict(batch=True, x_grad=True), id="batchtopk-xgrad"),
    pytest.param(dict(batch=False, b_pre=True), id="topk-bpre"),
    pytest.param(dict(batch=True, aux_k=48, dead_frac=0.3, b_pre=True, x_grad=True), id="batchtopk-aux-bpre-xgrad"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_fast_matches_reference_float32(case, device, seed):
    case = dict(case)
    batch, aux_k, b_pre = case.pop("batch"), case.pop("aux_k", 0), case.pop("b_pre", False)
    p = _problem(1024, 96, 1536, device=device, **case)
    k = 24
    lf, af, Lf, gf = _run(p, "fast", k=k, batch=batch, aux_k=aux_k, b_pre=b_pre)
    lr, ar, Lr, gr = _run(p, "reference", k=k, batch=batch, aux_k=aux_k, b_pre=b_pre)
    _same_latents(lf, lr, f"latents (seed {seed})")
    _canonical(lf)
    if batch:
        assert lf.nnz <= 1024 * k
    else:
        assert lf.nnz == 1024 * k
    assert (af is None) == (ar is None) == (aux_k == 0)
    if af is not None:
        _same_latents(af, ar, f"aux latents (seed {seed})")
        _canonical(af)
        n_dead = int(p["aux_mask"].sum())
        assert af.nnz == 1024 * min(aux_k, n_dead)
        assert bool(p["aux_mask"][af.cols].all()), "aux picks dead latents only"
    _close(Lf, Lr, 1e-6, 1e-6, f"loss (seed {seed})")
    assert gf.keys() == gr.keys()
    for name in gr:
        _close(gf[name], gr[name], F32_MAX, F32_NORM, f"grad {name} (seed {seed})")


@pytest.mark.parametrize("case", [c for c in CASES if "xgrad" in c.id or c.id in ("topk", "batchtopk-aux")])
def test_fast_matches_reference_bf16_matmul(case, seed):
    case = dict(case)
    batch, aux_k, b_pre = case.pop("batch"), case.pop("aux_k", 0), case.pop("b_pre", False)
    p = _problem(1024, 96, 1536, **case)
    k = 24
    lf, af, Lf, gf = _run(p, "fast", k=k, batch=batch, aux_k=aux_k, matmul_dtype=torch.bfloat16, b_pre=b_pre)
    lr, ar, Lr, gr = _run(p, "reference", k=k, batch=batch, aux_k=aux_k, matmul_dtype=torch.bfloat16, b_pre=b_pre)
    _same_latents(lf, lr, f"latents (seed {seed})")
    assert lf.values.dtype == torch.float32
    if af is not None:
        _same_latents(af, ar, f"aux latents (seed {seed})")
    _close(Lf, Lr, 1e-6, 1e-6, f"loss (seed {seed})")
    for name in gr:
        assert gf[name].dtype == torch.float32
        if name == "W_dec":
            _close(gf[name], gr[name], F32_MAX, F32_NORM, f"grad {name} (seed {seed})")
        else:
            _close(gf[name], gr[name], BF16_MAX, BF16_NORM, f"grad {name} (seed {seed})")
    # and the bf16 GEMM really is a bf16 GEMM: the selection differs from float32's somewhere at this size
    l32, _, _, _ = _run(p, "fast", k=k, batch=batch, aux_k=aux_k, b_pre=b_pre)
    assert not torch.equal(l32.values.detach(), lf.values.detach())


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("aux", [False, True])
def test_gradcheck_fast_float64(batch, aux, seed):
    """The custom backward against finite differences (float64, small, distinct values so the selection is stable)."""
    n, d, m, k = 6, 5, 12, 3
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    W_enc = torch.randn(d, m, dtype=torch.float64, requires_grad=True)
    b_enc = (0.5 + 0.1 * torch.randn(m, dtype=torch.float64)).requires_grad_()
    W_dec = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    b_pre = (0.1 * torch.randn(d, dtype=torch.float64)).requires_grad_()
    mask = (torch.arange(m) % 3 == 0) if aux else None

    def f(x, W_enc, b_enc, W_dec, b_pre):
        lat, al = encode_topk(x, W_enc, b_enc, k=k, batch=batch, aux_k=2 if aux else 0, aux_mask=mask, b_pre=b_pre)
        out = decode_sparse(lat, W_dec)
        if al is not None:
            out = out + 0.5 * decode_sparse(al, W_dec)
        return out

    assert torch.autograd.gradcheck(f, (x, W_enc, b_enc, W_dec, b_pre), eps=1e-6, atol=1e-7, rtol=1e-6), f"seed {seed}"


def _dense_relu_pre(p, matmul_dtype=None):
    x, W, b = p["x"].detach(), p["W_enc"], p["b_enc"]
    if matmul_dtype is not None:
        return torch.relu(x.to(matmul_dtype).float() @ W.to(matmul_dtype).float() + b.to(matmul_dtype).float())
    return torch.relu(x.double() @ W.double() + b.double()).float()


def test_topk_selection_properties(seed):
    """Independent of the shared selection code: each row keeps k values ≥ every value it drops."""
    p = _problem(2048, 64, 1024)
    k = 32
    lat, _ = encode_topk(p["x"], p["W_enc"], p["b_enc"], k=k)
    _canonical(lat)
    acts = _dense_relu_pre(p)
    kept = torch.zeros(acts.shape, dtype=torch.bool).index_put((lat.rows, lat.cols), torch.tensor(True))
    assert bool((kept.sum(1) == k).all())
    kept_min = acts.masked_fill(~kept, float("inf")).amin(1)
    dropped_max = acts.masked_fill(kept, -1.0).amax(1)
    # 1e-5: the float32 GEMM against the float64 check may order near-equal neighbours differently
    assert bool((kept_min >= dropped_max - 1e-5).all()), f"seed {seed}"
    torch.testing.assert_close(lat.values, acts[lat.rows, lat.cols], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias_shift", [0.0, -1.0, -3.0])
def test_batchtopk_selection_properties(bias_shift, seed):
    """BatchTopK keeps the N*k largest positive entries of the whole batch (nnz < N*k when positives are scarce)."""
    n, m, k = 2048, 1024, 16
    p = _problem(n, 64, m, bias_shift=bias_shift)
    lat, _ = encode_topk(p["x"], p["W_enc"], p["b_enc"], k=k, batch=True)
    _canonical(lat)
    acts = _dense_relu_pre(p)
    n_pos = int((acts > 1e-6).sum())
    assert lat.nnz == min(n * k, int((torch.addmm(p["b_enc"], p["x"], p["W_enc"]) > 0).sum()))
    if bias_shift <= -3.0:
        assert lat.nnz < n * k, "this case is meant to have fewer positives than N*k"
    assert bool((lat.values > 0).all())
    brute = acts.reshape(-1).topk(min(n * k, n_pos)).values
    got = lat.values.sort(descending=True).values
    m_ = min(got.numel(), brute.numel())
    torch.testing.assert_close(got[:m_], brute[:m_], rtol=1e-5, atol=1e-5)


def test_batchtopk_threshold_estimate_fallbacks(seed):
    """Adversarial layout for the subsampled threshold estimate (every 2nd row sampled): sampled rows hold a few
    huge values, the others many moderate ones, so the first estimate is far too high and the retries run."""
    n, m, k = 1024, 256, 8
    pre = torch.rand(n, m) * 0.5
    pre[0::2, : k + k // 2] += 100.0 + torch.rand(n // 2, k + k // 2)  # sampled rows: 1.5k huge entries each
    pre[1::2] += 1.0  # the rest: many moderate entries
    pre[5] = -1.0  # one row with nothing positive
    x = torch.eye(n)
    lat, _ = encode_topk(x, pre, torch.zeros(m), k=k, batch=True)
    _canonical(lat)
    brute = pre.reshape(-1).topk(n * k)
    assert torch.equal(torch.sort(lat.rows * m + lat.cols).values, torch.sort(brute.indices).values), f"seed {seed}"
    assert not bool((lat.rows == 5).any())


def test_k_equals_d_sae_is_dense_relu(seed):
    p = _problem(256, 32, 64, x_grad=True)
    lf, _, Lf, gf = _run(p, "fast", k=64)
    lb, _, Lb, gb = _run(p, "fast", k=64, batch=True)
    # a dense ReLU SAE computed independently
    x = p["x"].detach().clone().requires_grad_()
    W_enc, b_enc, W_dec = (p[n].detach().clone().requires_grad_() for n in ("W_enc", "b_enc", "W_dec"))
    z = torch.relu(x @ W_enc + b_enc)
    loss = (x - (z @ W_dec + p["b_dec"])).pow(2).sum(1).mean()
    loss.backward()
    assert lf.nnz == 256 * 64
    torch.testing.assert_close(lf.to_dense(), z.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lb.to_dense(), z.detach(), rtol=1e-5, atol=1e-6)
    for g in (gf, gb):
        for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("x", x)):
            _close(g[name], t.grad, F32_MAX, F32_NORM, f"{name} (seed {seed})")


@pytest.mark.parametrize("batch", [False, True])
def test_all_zero_rows(batch, seed):
    """Rows whose pre-activations are all ≤ 0: TopK lists k zeros for them, BatchTopK nothing; no gradient."""
    p = _problem(512, 48, 384, x_grad=True)
    p["b_enc"] = p["b_enc"].abs().neg() - 0.01  # so x = 0 gives pre = b_enc < 0
    with torch.no_grad():
        p["x"][::7] = 0.0
    lf, _, Lf, gf = _run(p, "fast", k=16, batch=batch)
    lr, _, Lr, gr = _run(p, "reference", k=16, batch=batch)
    _same_latents(lf, lr, f"seed {seed}")
    zero_rows = torch.arange(512)[::7]
    in_zero = torch.isin(lf.rows, zero_rows)
    if batch:
        assert not bool(in_zero.any())
    else:
        assert int(in_zero.sum()) == len(zero_rows) * 16 and bool((lf.values[in_zero] == 0).all())
    for name in gr:
        _close(gf[name], gr[name], F32_MAX, F32_NORM, f"{name} (seed {seed})")
    assert bool((gf["x"][::7] != 0).any())  # x still gets the reconstruction gradient …
    _close(gf["x"][::7], 2.0 * (p["x"][::7].detach() - p["b_dec"]) / 512, F32_MAX, F32_NORM, "x grad of empty rows")  # … only


@pytest.mark.parametrize("batch", [False, True])
def test_ties(batch, seed):
    """Small-integer data: exact ties everywhere, including at the k-th value. Both paths must agree."""
    n, d, m, k = 512, 8, 256, 12
    p = _problem(n, d, m, x_grad=True)
    p["x"] = torch.randint(-2, 3, (n, d)).float().requires_grad_()
    p["W_enc"] = torch.randint(-1, 2, (d, m)).float()
    p["b_enc"] = torch.randint(0, 2, (m,)).float()
    p["aux_mask"] = torch.arange(m) % 4 == 0
    lf, af, Lf, gf = _run(p, "fast", k=k, batch=batch, aux_k=10)
    lr, ar, Lr, gr = _run(p, "reference", k=k, batch=batch, aux_k=10)
    _same_latents(lf, lr, f"seed {seed}")
    _same_latents(af, ar, f"seed {seed}")
    _canonical(lf)
    acts = _dense_relu_pre(p)
    if not batch:  # still a valid top-k: kept ≥ dropped in every row
        kept = torch.zeros(n, m, dtype=torch.bool).index_put((lf.rows, lf.cols), torch.tensor(True))
        assert bool((acts.masked_fill(~kept, float("inf")).amin(1) >= acts.masked_fill(kept, -1).amax(1)).all())
    else:
        assert lf.nnz == n * k
    for name in gr:
        _close(gf[name], gr[name], F32_MAX, F32_NORM, f"{name} (seed {seed})")


def test_aux_none_cases(seed):
    p = _problem(128, 16, 64)
    args = (p["x"], p["W_enc"], p["b_enc"])
    for impl in ("fast", "reference"):
        assert encode_topk(*args, k=4, impl=impl)[1] is None
        assert encode_topk(*args, k=4, aux_k=8, impl=impl)[1] is None  # no mask
        assert encode_topk(*args, k=4, aux_k=0, aux_mask=torch.ones(64, dtype=torch.bool), impl=impl)[1] is None
        assert encode_topk(*args, k=4, aux_k=8, aux_mask=torch.zeros(64, dtype=torch.bool), impl=impl)[1] is None
        all_dead = encode_topk(*args, k=4, aux_k=8, aux_mask=torch.ones(64, dtype=torch.bool), impl=impl)[1]
        assert all_dead is not None and all_dead.nnz == 128 * 8


def test_aux_gradient_only_through_dead_latents(seed):
    p = _problem(512, 32, 256, dead_frac=0.25)
    W_enc, b_enc = p["W_enc"].clone().requires_grad_(), p["b_enc"].clone().requires_grad_()
    _, aux = encode_topk(p["x"], W_enc, b_enc, k=8, aux_k=16, aux_mask=p["aux_mask"])
    decode_sparse(aux, p["W_dec"]).pow(2).sum().backward()
    alive = ~p["aux_mask"]
    assert bool((b_enc.grad[alive] == 0).all()) and bool((W_enc.grad[:, alive] == 0).all())
    assert bool((b_enc.grad[p["aux_mask"]] != 0).any())


def test_decode_filtered_latents_and_to_dense(seed):
    """Matryoshka-style prefix decoding: filtering a canonical SparseLatents keeps it canonical and decodable."""
    p = _problem(512, 32, 512)
    W_dec = p["W_dec"].clone().requires_grad_()
    lat, _ = encode_topk(p["x"], p["W_enc"], p["b_enc"], k=16)
    keep = lat.cols < 128
    sub = SparseLatents(lat.values[keep], lat.rows[keep], lat.cols[keep], lat.shape)
    _canonical(sub)
    out = decode_sparse(sub, W_dec)
    dense = lat.to_dense()
    dense[:, 128:] = 0
    ref = dense @ W_dec
    _close(out, ref, F32_MAX, F32_NORM, "prefix decode")
    g = torch.randn_like(out)
    (gf,) = torch.autograd.grad(out, W_dec, g)
    (gr,) = torch.autograd.grad(ref, W_dec, g)
    _close(gf, gr, F32_MAX, F32_NORM, "prefix decode W_dec grad")



@pytest.mark.parametrize("batch", [False, True])
def test_block_decoding_matches_the_wide_decoder_and_the_reference(batch, seed):
    """decode_sparse_blocks(W [m, B, d]) is decode_sparse of the [m, B·d] decoder split by block, and the reference,
    in values and in the gradients of the values and of W."""
    p = _problem(512, 32, 256)
    lat, _ = encode_topk(p["x"], p["W_enc"], p["b_enc"], k=8, batch=batch)
    values = lat.values.detach().requires_grad_()
    lat = SparseLatents(values, lat.rows, lat.cols, lat.shape)
    W = torch.randn(256, 3, 24, requires_grad=True)
    g = [torch.randn(512, 24) for _ in range(3)]
    results = {}
    for impl in ("fast", "reference"):
        blocks = decode_sparse_blocks(lat, W, impl=impl)
        assert len(blocks) == 3 and all(b.shape == (512, 24) for b in blocks)
        results[impl] = (blocks, torch.autograd.grad(blocks, (values, W), g))
    wide = decode_sparse(lat, W.reshape(256, -1))
    (fast, (fv, fw)), (ref, (rv, rw)) = results["fast"], results["reference"]
    for b in range(3):
        _close(fast[b], wide[:, b * 24:(b + 1) * 24], F32_MAX, F32_NORM, f"block {b} vs the wide decoder")
        _close(fast[b], ref[b], F32_MAX, F32_NORM, f"block {b} vs the reference")
    _close(fv, rv, F32_MAX, F32_NORM, "values grad")
    _close(fw, rw, F32_MAX, F32_NORM, "W grad")
    assert fw.is_contiguous()  # the decoder-norm hooks update it through a view
    with pytest.raises(ValueError, match="blocks"):
        decode_sparse_blocks(lat, W.reshape(256, -1))

def test_workspace_reuse_between_shapes(seed):
    """The CPU scratch buffer is reused across calls of different sizes without leaking stale values."""
    big = _problem(1024, 32, 512)
    small = _problem(64, 32, 128)
    for p in (big, small, big):
        lf, _, _, gf = _run(p, "fast", k=8)
        lr, _, _, gr = _run(p, "reference", k=8)
        _same_latents(lf, lr, f"seed {seed}")
        for name in gr:
            _close(gf[name], gr[name], F32_MAX, F32_NORM, name)


def test_bad_arguments():
    x, W, b = torch.randn(4, 3), torch.randn(3, 5), torch.zeros(5)
    with pytest.raises(ValueError):
        encode_topk(x, W, b, k=0)
    with pytest.raises(ValueError):
        encode_topk(x, W, b, k=6)
    with pytest.raises(ValueError):
        encode_topk(x, W, b, k=2, impl="triton")
    with pytest.raises(ValueError):
        encode_topk(x, W.t(), b, k=2)
    with pytest.raises(ValueError):
        encode_topk(x, W, b, k=2, aux_k=2, aux_mask=torch.ones(5))  # not bool
    with pytest.raises(ValueError):
        encode_topk(x.double(), W, b, k=2)
    with pytest.raises(ValueError):
        encode_topk(x, W, b, k=2, b_pre=torch.zeros(4))
    lat, _ = encode_topk(x, W, b, k=2)
    with pytest.raises(ValueError):
        decode_sparse(lat, torch.randn(4, 3))


def test_cached_index_plan_is_not_reused_for_a_changed_pattern(seed):
    """The fast path caches index bookkeeping on the pattern's tensors; editing them in place must invalidate it."""
    p = _problem(256, 16, 128)
    W_dec = p["W_dec"].clone().requires_grad_()
    lat, _ = encode_topk(p["x"], p["W_enc"], p["b_enc"], k=4)
    decode_sparse(lat, W_dec)  # builds and caches the plan
    with torch.no_grad():
        lat.cols.copy_(torch.arange(4).repeat(256) + 8 * (torch.arange(256) % 4).repeat_interleave(4))  # canonical
    out = decode_sparse(lat, W_dec)
    _close(out, lat.to_dense() @ W_dec, F32_MAX, F32_NORM, "decode after an in-place change of cols")
    g = torch.randn_like(out)
    (gf,) = torch.autograd.grad(out, W_dec, g)
    _close(gf, lat.to_dense().t() @ g, F32_MAX, F32_NORM, "W_dec grad after an in-place change of cols")
    # the same cols tensor paired with another rows tensor gets its own plan
    rows2 = lat.rows.clone()
    lat2 = SparseLatents(lat.values, rows2, lat.cols, lat.shape)
    _close(decode_sparse(lat2, W_dec), lat2.to_dense() @ W_dec, F32_MAX, F32_NORM, "decode with new rows tensor")


@pytest.mark.parametrize("data", ["random", "ties", "constant_rows"])
def test_two_level_row_topk_matches_torch_topk(data, seed):
    """The chunked per-row top-k (CPU float32 fast path) keeps a valid top-k: the same values as torch.topk."""
    from saeforge.kernels.sparse_topk import _CHUNK, _topk_rows

    n, m, k = 1024, 2048, 24
    assert k * _CHUNK * 4 <= m  # the two-level path is the one under test
    if data == "random":
        pre = torch.randn(n, m)
    elif data == "ties":
        pre = torch.randint(-3, 4, (n, m)).float()
    else:
        pre = torch.randn(n, 1).expand(n, m).contiguous()
    vals, idx = _topk_rows(pre, k)
    assert torch.equal(pre.gather(1, idx), vals)
    assert bool((idx.sort(1).values.diff(dim=1) > 0).all()), "distinct columns"
    ref = pre.topk(k, dim=1).values
    assert torch.equal(vals.sort(1, descending=True).values, ref), f"seed {seed}"
    if data == "random":  # no ties: the very same columns
        assert torch.equal(idx.sort(1).values, pre.topk(k, dim=1).indices.sort(1).values)


def test_ties_with_two_level_selection(seed):
    """Exact ties everywhere with the chunked selection active (d_sae ≥ 64 k): fast and reference agree."""
    n, d, m, k = 512, 8, 1024, 8
    p = _problem(n, d, m, x_grad=True)
    p["x"] = torch.randint(-2, 3, (n, d)).float().requires_grad_()
    p["W_enc"] = torch.randint(-1, 2, (d, m)).float()
    p["b_enc"] = torch.randint(0, 2, (m,)).float()
    lf, _, Lf, gf = _run(p, "fast", k=k)
    lr, _, Lr, gr = _run(p, "reference", k=k)
    _same_latents(lf, lr, f"seed {seed}")
    acts = _dense_relu_pre(p)
    kept = torch.zeros(n, m, dtype=torch.bool).index_put((lf.rows, lf.cols), torch.tensor(True))
    assert bool((acts.masked_fill(~kept, float("inf")).amin(1) >= acts.masked_fill(kept, -1).amax(1)).all())
    for name in gr:
        _close(gf[name], gr[name], F32_MAX, F32_NORM, f"{name} (seed {seed})")
