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
    """The parent's thread pool does not survive fork; the child must start its own instead of waiting forever."""
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
