"""Sparse TopK / BatchTopK / AuxK encoding and sparse decoding for SAEs.

Two implementations of one API:

- ``impl="reference"``: plain PyTorch. Dense pre-activations, ``torch.topk``, dense masked latents, dense decode
  matmul; autograd does the rest. Slow and memory-hungry (the [N, d_sae] graph is kept), but obviously right.
- ``impl="fast"`` (default): two ``torch.autograd.Function``s whose only dense work is the encoder GEMM.

Design of the fast path (timings: 2-core AVX-512 CPU, torch 2.13, N=4096, d_in=576, d_sae=4608, k=32, float32;
see ``docs/perf-notes`` in the shared folder and ``benchmarks/train_step.py``):

- Encoder forward: one ``addmm`` (the floor, ~110-150 ms) written into a reused per-thread workspace on CPU (a
  fresh 75 MB result costs ~15-25 ms of page faults every step; CUDA's caching allocator makes this moot), then
  ``topk`` on the pre-ReLU values (~25-30 ms; the ReLU is applied to the N*k selected values only, which skips a
  full pass over [N, d_sae]). The dense pre-activations are dropped before returning: the backward never needs them.
- Decoder forward: ``F.embedding_bag(cols, W_dec, offsets, per_sample_weights=values, mode="sum")`` (~2 ms; a CSR
  ``@`` is ~5 ms).
- Decoder backward, d(values): the N*k selected dot products g[row]·W_dec[col] with
  ``torch.sparse.sampled_addmm`` on the CSR pattern (~3 ms; a dense GEMM + gather is ~180 ms).
- Weight gradients (dW_dec = Sᵀ g and dW_encᵀ = Sᵀ x, S the sparse latent matrix): sort the entries by column
  once, then ``embedding_bag`` over the rows of g / x with the values as per-sample weights and one bag per latent
  (~2-4 ms; ``csr.t() @ g`` is ~10-25 ms, ``index_add_`` of outer products ~125 ms).
- Encoder backward, dx = S W_encᵀ: ``embedding_bag`` over the rows of W_encᵀ (only when x requires grad);
  db_enc: ``index_add_``.

All ops used exist on CUDA as well (``sampled_addmm`` needs a CSR pattern with sorted columns, which is why the
latents are kept in canonical order). With ``matmul_dtype=torch.bfloat16`` only the encoder GEMM runs in bfloat16
(operands cast like autocast); everything sparse, the values and all gradients are in the parameter dtype, and the
weight gradient of the encoder uses the bfloat16-rounded x that the GEMM saw (the exact derivative of the computed
function, without autocast's extra rounding of the incoming gradient to bfloat16).
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# The CSR patterns below are internal and valid by construction; silence torch's one-off "beta" notice about them.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

__all__ = ["SparseLatents", "encode_topk", "decode_sparse", "clear_workspace"]

_IMPLS = ("fast", "reference")


class SparseLatents(NamedTuple):
    """Sparse latent activations of a batch in canonical COO order.

    ``rows`` is sorted ascending and, within a row, ``cols`` is sorted ascending (so ``(rows, cols)`` is a valid
    CSR pattern). ``values`` is differentiable; ``rows``/``cols`` are int64 and carry no gradient.
    """

    values: Tensor
    rows: Tensor
    cols: Tensor
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def to_dense(self) -> Tensor:
        """[N, d_sae] dense tensor (differentiable with respect to ``values``)."""
        out = self.values.new_zeros(self.shape)
        return out.index_put((self.rows, self.cols), self.values)


def _check_impl(impl: str) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")


def _linear_pre(x: Tensor, W_enc: Tensor, b_enc: Tensor, matmul_dtype: torch.dtype | None) -> Tensor:
    """Pre-activations ``x @ W_enc + b_enc`` (before the ReLU), one ``addmm``.

    With ``matmul_dtype`` set (and different from the parameter dtype) all three operands are cast to it, as
    autocast does for ``addmm``; the result is in ``matmul_dtype``. Both implementations call exactly this, so
    they select exactly the same latents even where values tie (frequent in bfloat16).
    """
    if matmul_dtype is not None and matmul_dtype != W_enc.dtype:
        return torch.addmm(b_enc.to(matmul_dtype), x.to(matmul_dtype), W_enc.to(matmul_dtype))
    return torch.addmm(b_enc, x, W_enc)


class _Selection(NamedTuple):
    rows: Tensor
    cols: Tensor
    # position of each selected entry in the flattened [N * d_sae] pre-activation matrix
    flat: Tensor


def _row_major(idx: Tensor, n_rows: int, d_sae: int, col_map: Tensor | None = None) -> _Selection:
    """[N, k] column indices -> canonical selection (rows ascending, cols ascending within a row)."""
    if col_map is not None:
        idx = col_map[idx]
    idx, _ = idx.sort(dim=1)
    kk = idx.shape[1]
    rows = torch.arange(n_rows, device=idx.device).repeat_interleave(kk)
    cols = idx.reshape(-1)
    return _Selection(rows, cols, rows * d_sae + cols)


@torch.no_grad()
def _select(pre: Tensor, k: int, batch: bool) -> _Selection:
    """Which entries of the pre-activations [N, d_sae] the TopK / BatchTopK keeps (selection only, no values).

    Selection is on the pre-ReLU values; values are ReLU'd afterwards. ReLU is monotone, so this keeps the same
    values as top-k of ReLU(pre); only which zero-valued entries are listed could differ, and those carry neither
    output nor gradient. TopK (``batch=False``) keeps exactly ``k`` entries per row (zeros included, so
    ``values.view(N, k)`` works); BatchTopK drops entries whose value is 0 (nnz <= N*k).
    """
    n, d_sae = pre.shape
    if not batch:
        idx = pre.topk(k, dim=1, sorted=False).indices
        return _row_major(idx, n, d_sae)
    flat = _batch_topk_flat(pre, n * k)
    return _Selection(torch.div(flat, d_sae, rounding_mode="floor"), flat % d_sae, flat)


def _batch_topk_flat(pre: Tensor, kk: int) -> Tensor:
    """Sorted flat indices of the ``kk`` largest *positive* entries of ``pre`` (all positives if there are fewer).

    A flat ``topk`` over N*d_sae elements is slow on CPU (~250 ms at 4096x4608 against ~30 ms for the per-row
    topk), so: estimate a threshold t from a subsample of rows (per-row top-2k of every s-th row), take the
    candidates ``pre >= t`` (one compare + nonzero pass), and if there are at least kk of them the exact answer is
    the top kk among the candidates (everything outside is < t <= the kk-th largest). If the estimate was too high
    (fewer than kk candidates), retry with a lower threshold; the last resort is t = 0 (all positives), which is
    always exact. The result is exact in every case; only the cost depends on the estimate.
    """
    n, d_sae = pre.shape
    flat_pre = pre.reshape(-1)
    if kk <= 0:
        return torch.empty(0, dtype=torch.long, device=pre.device)
    step = max(1, n // 512)
    sub = pre[::step]
    ks = min(d_sae, 2 * max(1, kk // n))
    sub_top = sub.topk(ks, dim=1, sorted=False).values.reshape(-1)
    per_row = kk / n
    for margin in (1.25, 4.0, None):
        if margin is None:
            t = None
        else:
            r = min(sub_top.numel(), math.ceil(sub.shape[0] * per_row * margin))
            t = sub_top.topk(r, sorted=False).values.min()
            if not bool(t > 0):
                t = None
        cand = (flat_pre > 0 if t is None else flat_pre >= t).nonzero().squeeze(1)
        if cand.numel() >= kk:
            cand = cand[flat_pre[cand].topk(kk, sorted=False).indices]
            break
        if t is None:  # fewer than kk positive entries: all of them
            break
    return cand.sort().values


@torch.no_grad()
def _select_aux(pre: Tensor, aux_k: int, aux_mask: Tensor | None) -> _Selection | None:
    """AuxK: per row, the top min(aux_k, #dead) pre-activations among dead latents (``aux_mask`` True)."""
    if aux_k <= 0 or aux_mask is None:
        return None
    n, d_sae = pre.shape
    if aux_mask.shape != (d_sae,) or aux_mask.dtype != torch.bool:
        raise ValueError(f"aux_mask must be a bool tensor of shape ({d_sae},), got {aux_mask.dtype} {tuple(aux_mask.shape)}")
    dead = aux_mask.to(pre.device).nonzero().squeeze(1)
    n_dead = int(dead.numel())
    if n_dead == 0:
        return None
    ka = min(aux_k, n_dead)
    if n_dead == d_sae:
        idx = pre.topk(ka, dim=1, sorted=False).indices
        return _row_major(idx, n, d_sae)
    idx = pre.index_select(1, dead).topk(ka, dim=1, sorted=False).indices
    return _row_major(idx, n, d_sae, col_map=dead)


def _check_encode_args(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> None:
    if x.dim() != 2 or W_enc.dim() != 2 or b_enc.dim() != 1:
        raise ValueError(f"expected x [N, d_in], W_enc [d_in, d_sae], b_enc [d_sae]; got {tuple(x.shape)}, "
                         f"{tuple(W_enc.shape)}, {tuple(b_enc.shape)}")
    if x.shape[1] != W_enc.shape[0] or b_enc.shape[0] != W_enc.shape[1]:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, W_enc {tuple(W_enc.shape)}, b_enc {tuple(b_enc.shape)}")
    if not 1 <= k <= W_enc.shape[1]:
        raise ValueError(f"k must be in [1, d_sae={W_enc.shape[1]}], got {k}")
    if x.dtype != W_enc.dtype or b_enc.dtype != W_enc.dtype:
        raise ValueError(f"x, W_enc, b_enc must share a dtype; got {x.dtype}, {W_enc.dtype}, {b_enc.dtype}")


def _encode_reference(x, W_enc, b_enc, k, batch, aux_k, aux_mask, matmul_dtype):
    """Plain PyTorch: dense pre-activations, torch.topk, dense masked latents; autograd does the rest."""
    n, d_sae = x.shape[0], W_enc.shape[1]
    pre = _linear_pre(x, W_enc, b_enc, matmul_dtype)
    acts = torch.relu(pre).to(W_enc.dtype)  # [N, d_sae], differentiable

    def gather(sel: _Selection) -> SparseLatents:
        mask = torch.zeros(n * d_sae, dtype=torch.bool, device=x.device)
        mask[sel.flat] = True
        dense = acts * mask.view(n, d_sae)  # dense masked latents: gradient only through the selected entries
        return SparseLatents(dense[sel.rows, sel.cols], sel.rows, sel.cols, (n, d_sae))

    main = gather(_select(pre.detach(), k, batch))
    sel_aux = _select_aux(pre.detach(), aux_k, aux_mask)
    return main, (gather(sel_aux) if sel_aux is not None else None)


# ----------------------------------------------------------------------------------------------------------------
# fast path

_tls = threading.local()


def _workspace(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reused per-thread scratch buffer for the dense pre-activations (CPU only).

    On CPU a fresh [N, d_sae] result is a fresh mmap that page-faults on first touch (~15-25 ms per step at the
    benchmark shape); reusing one buffer avoids that. The buffer only lives inside ``encode_topk`` (nothing
    returned aliases it) and is kept at its largest size; ``clear_workspace()`` frees it.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    cache = getattr(_tls, "ws", None)
    if cache is None:
        cache = _tls.ws = {}
    need = shape[0] * shape[1]
    buf = cache.get(dtype)
    if buf is None or buf.numel() < need:
        buf = cache[dtype] = torch.empty(need, dtype=dtype)
    return buf[:need].view(shape)


def clear_workspace() -> None:
    """Free this thread's CPU scratch buffer (see ``_workspace``)."""
    _tls.ws = {}


def _row_offsets(rows: Tensor, n_rows: int) -> Tensor:
    """Start of each row's run in a row-sorted COO (the ``offsets`` of ``embedding_bag``), [N]."""
    counts = torch.bincount(rows, minlength=n_rows)
    return counts.cumsum(0) - counts


def _csr_pattern(rows: Tensor, cols: Tensor, n_rows: int, n_cols: int, values: Tensor) -> Tensor:
    counts = torch.bincount(rows, minlength=n_rows)
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return torch.sparse_csr_tensor(crow, cols, values, size=(n_rows, n_cols), check_invariants=False)


def _sparse_t_matmul(rows: Tensor, cols: Tensor, weights: Tensor, dense: Tensor, n_cols: int) -> Tensor:
    """Sᵀ @ dense -> [n_cols, dense.shape[1]] for S = COO(rows, cols, weights) of shape [dense.shape[0], n_cols].

    One bag per column of S: sort the entries by column, then ``embedding_bag`` over the rows of ``dense`` with the
    weights as per-sample weights. Works for any row order (the main and aux entries are simply concatenated).
    """
    if rows.numel() == 0:
        return dense.new_zeros(n_cols, dense.shape[1])
    cols_sorted, perm = cols.sort(stable=True)
    counts = torch.bincount(cols_sorted, minlength=n_cols)
    return F.embedding_bag(rows[perm], dense, counts.cumsum(0) - counts, mode="sum",
                           per_sample_weights=weights[perm].to(dense.dtype))


def _sparse_matmul(rows: Tensor, cols: Tensor, weights: Tensor, dense: Tensor, n_rows: int) -> Tensor:
    """S @ dense -> [n_rows, dense.shape[1]] for a row-sorted COO S (``embedding_bag`` with row offsets)."""
    if rows.numel() == 0:
        return dense.new_zeros(n_rows, dense.shape[1])
    return F.embedding_bag(cols, dense, _row_offsets(rows, n_rows), mode="sum",
                           per_sample_weights=weights.to(dense.dtype))


def _sampled_dots(rows: Tensor, cols: Tensor, a: Tensor, b: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """out[e] = a[rows[e]] · b[cols[e]] for a canonical (row-sorted, column-sorted within rows) COO pattern."""
    if rows.numel() == 0:
        return a.new_zeros(0)
    if a.dtype in (torch.float32, torch.float64):
        pattern = _csr_pattern(rows, cols, n_rows, n_cols, a.new_zeros(rows.numel()))  # beta*0, not beta*garbage
        return torch.sparse.sampled_addmm(pattern, a, b.t(), beta=0.0).values()
    # sampled_addmm has no CPU kernel for half/bfloat16 (and cuSPARSE's support varies): compute in float32
    return _sampled_dots(rows, cols, a.float(), b.float(), n_rows, n_cols).to(a.dtype)


def _gather_values(pre: Tensor, sel: _Selection, dtype: torch.dtype) -> Tensor:
    return pre.reshape(-1).index_select(0, sel.flat).relu_().to(dtype)


class _EncodeFn(torch.autograd.Function):
    """Sparse TopK / BatchTopK (+ AuxK) encoder: dense GEMM forward, backward only through the selected entries."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, batch, aux_k, aux_mask, matmul_dtype):
        n, d_sae = x.shape[0], W_enc.shape[1]
        dtype = W_enc.dtype
        low = matmul_dtype is not None and matmul_dtype != dtype
        xm, Wm, bm = (x.to(matmul_dtype), W_enc.to(matmul_dtype), b_enc.to(matmul_dtype)) if low else (x, W_enc, b_enc)
        pre = _workspace((n, d_sae), xm.dtype, x.device)
        torch.addmm(bm, xm, Wm, out=pre)  # the same op as _linear_pre, so the same bits as the reference

        sel = _select(pre, k, batch)
        values = _gather_values(pre, sel, dtype)
        sel_aux = _select_aux(pre, aux_k, aux_mask)
        if sel_aux is not None:
            aux_values = _gather_values(pre, sel_aux, dtype)
            aux_rows, aux_cols = sel_aux.rows, sel_aux.cols
        else:
            aux_values = values.new_empty(0)
            aux_rows = aux_cols = sel.rows.new_empty(0)
        del pre

        ctx.n, ctx.d_sae, ctx.dtype = n, d_sae, dtype
        ctx.has_aux = sel_aux is not None
        # dW_enc needs x (as the GEMM saw it); dx needs W_enc
        ctx.save_for_backward(xm if ctx.needs_input_grad[1] else None, Wm if ctx.needs_input_grad[0] else None,
                              values, sel.rows, sel.cols,
                              aux_values, aux_rows, aux_cols)
        ctx.mark_non_differentiable(sel.rows, sel.cols, aux_rows, aux_cols)
        return values, sel.rows, sel.cols, aux_values, aux_rows, aux_cols

    @staticmethod
    @once_differentiable
    def backward(ctx, g_values, _g_rows, _g_cols, g_aux, _g_arows, _g_acols):
        xm, Wm, values, rows, cols, aux_values, aux_rows, aux_cols = ctx.saved_tensors
        # d/dpre of ReLU at the selected entries (values > 0 <=> pre > 0)
        gp = g_values * (values > 0)
        if ctx.has_aux:
            rows_all = torch.cat([rows, aux_rows])
            cols_all = torch.cat([cols, aux_cols])
            gp_all = torch.cat([gp, g_aux * (aux_values > 0)])
        else:
            rows_all, cols_all, gp_all = rows, cols, gp
        dx = dW = db = None
        if ctx.needs_input_grad[0]:
            Wt = Wm.t().contiguous().to(ctx.dtype)
            dx = _sparse_matmul(rows, cols, gp, Wt, ctx.n)
            if ctx.has_aux:
                dx = dx + _sparse_matmul(aux_rows, aux_cols, gp_all[rows.numel():], Wt, ctx.n)
        if ctx.needs_input_grad[1]:
            dW = _sparse_t_matmul(rows_all, cols_all, gp_all, xm.to(ctx.dtype), ctx.d_sae).t()
        if ctx.needs_input_grad[2]:
            db = gp_all.new_zeros(ctx.d_sae).index_add_(0, cols_all, gp_all)
        return dx, dW, db, None, None, None, None, None


class _DecodeFn(torch.autograd.Function):
    """``dense(latents) @ W_dec`` touching only the stored entries, forward and backward."""

    @staticmethod
    def forward(ctx, values, rows, cols, n, W_dec):
        out = _sparse_matmul(rows, cols, values, W_dec, n)
        ctx.n = n
        ctx.save_for_backward(values, rows, cols, W_dec)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        values, rows, cols, W_dec = ctx.saved_tensors
        g = g.contiguous()
        dv = dW = None
        if ctx.needs_input_grad[0]:
            dv = _sampled_dots(rows, cols, g, W_dec, ctx.n, W_dec.shape[0]).to(values.dtype)
        if ctx.needs_input_grad[4]:
            dW = _sparse_t_matmul(rows, cols, values, g, W_dec.shape[0])
        return dv, None, None, None, dW


def encode_topk(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    *,
    k: int,
    batch: bool = False,
    aux_k: int = 0,
    aux_mask: Tensor | None = None,
    matmul_dtype: torch.dtype | None = None,
    impl: str = "fast",
) -> tuple[SparseLatents, SparseLatents | None]:
    """TopK (or BatchTopK) encoding ``ReLU(x @ W_enc + b_enc)`` returned sparse, plus the optional AuxK selection.

    x: [N, d_in]; W_enc: [d_in, d_sae]; b_enc: [d_sae].

    - ``batch=False`` (TopK): per row the ``k`` largest; exactly N*k entries (a row with fewer than k positive
      pre-activations lists zeros, which carry no gradient).
    - ``batch=True`` (BatchTopK): the N*k largest over the flattened batch; zero-valued entries dropped, nnz <= N*k.
    - AuxK (``aux_k > 0`` and ``aux_mask`` given, bool [d_sae], True = dead): per row the top
      ``min(aux_k, #dead)`` pre-activations restricted to dead latents, ReLU applied after the selection (the
      OpenAI reference semantics; since ReLU is monotone the values equal top-k of ReLU(pre) over dead latents).
      Exactly N*min(aux_k, #dead) entries, zeros included. ``None`` when aux is not requested or no latent is dead.
    - Gradients reach ``W_enc``, ``b_enc`` and ``x`` only through the selected entries of both selections.
    - ``matmul_dtype`` (e.g. ``torch.bfloat16``): the encoder GEMM runs in that dtype (operands cast as autocast
      does); values and gradients come back in the parameter dtype.
    """
    _check_impl(impl)
    _check_encode_args(x, W_enc, b_enc, k)
    if impl == "reference":
        return _encode_reference(x, W_enc, b_enc, k, batch, aux_k, aux_mask, matmul_dtype)
    n, d_sae = x.shape[0], W_enc.shape[1]
    has_aux = aux_k > 0 and aux_mask is not None and bool(aux_mask.any())  # (_select_aux validates the mask)
    values, rows, cols, aux_values, aux_rows, aux_cols = _EncodeFn.apply(
        x, W_enc, b_enc, k, batch, aux_k if has_aux else 0, aux_mask if has_aux else None, matmul_dtype)
    main = SparseLatents(values, rows, cols, (n, d_sae))
    if not has_aux:
        return main, None
    return main, SparseLatents(aux_values, aux_rows, aux_cols, (n, d_sae))


def decode_sparse(latents: SparseLatents, W_dec: Tensor, *, impl: str = "fast") -> Tensor:
    """``dense(latents) @ W_dec`` -> [N, d_out] (no bias). W_dec: [d_sae, d_out]."""
    _check_impl(impl)
    if W_dec.dim() != 2 or W_dec.shape[0] != latents.shape[1]:
        raise ValueError(f"W_dec must be [d_sae={latents.shape[1]}, d_out], got {tuple(W_dec.shape)}")
    if impl == "reference":
        return latents.to_dense().to(W_dec.dtype) @ W_dec
    return _DecodeFn.apply(latents.values, latents.rows, latents.cols, latents.shape[0], W_dec)
