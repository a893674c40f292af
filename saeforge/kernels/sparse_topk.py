"""Sparse TopK / BatchTopK / AuxK encoding and sparse decoding for SAEs.

Two implementations of one API:

- ``impl="reference"``: plain PyTorch. Dense pre-activations, ``torch.topk``, dense masked latents, dense decode
  matmul; autograd does the rest. Slow and memory-hungry (the [N, d_sae] graph is kept), but obviously right.
- ``impl="fast"`` (default): two ``torch.autograd.Function``s whose only dense work is the encoder GEMM.

Design of the fast path (timings: 2-core AVX-512 CPU, torch 2.13, N=4096, d_in=576, d_sae=4608, k=32, float32;
measured with ``benchmarks/train_step.py``):

- Encoder forward: one ``addmm`` (the floor, ~105-125 ms) written into a reused per-thread workspace on CPU (a
  fresh 75 MB result costs ~15-25 ms of page faults every step; CUDA's caching allocator makes this moot), then the
  per-row top-k on the pre-ReLU values. ``torch.topk`` takes ~25 ms there; on CPU/float32 a two-level selection
  (``max_pool1d`` chunk maxima -> top-k chunks -> top-k of their k*16 candidates, see ``_topk_rows``) gives the same
  set in ~17 ms, and the compiled kernel of :mod:`saeforge.kernels.native` (C, built on first use; this PyTorch
  selection is its fallback) in ~2-5 ms after the GEMM, already in canonical order. The ReLU is applied to the N*k selected values only (no pass over [N, d_sae]), and the dense
  pre-activations are dropped before returning: the backward never needs them.
- Decoder forward: ``F.embedding_bag(cols, W_dec, offsets, per_sample_weights=values, mode="sum")`` (~2 ms; a CSR
  ``@`` is ~5 ms).
- Decoder backward, d(values): the N*k selected dot products g[row]·W_dec[col] with
  ``torch.sparse.sampled_addmm`` on the CSR pattern (~3 ms; a dense GEMM + gather is ~180 ms).
- Weight gradients (dW_dec = Sᵀ g and dW_encᵀ = Sᵀ x, S the sparse latent matrix): sort the entries by column
  once, then ``embedding_bag`` over the rows of g / x with the values as per-sample weights and one bag per latent
  (~2-4 ms; ``csr.t() @ g`` is ~10-25 ms, ``index_add_`` of outer products ~125 ms).
- With the compiled kernels (CPU, float32 parameters) the decoder side (d(values) and dW_dec) is one pass over the
  entries grouped by latent (a counting sort gives the order), and the encoder side (dW_enc straight into the
  parameter's [d_in, d_sae] layout, and db_enc) another: ~3.3 ms each, against ~14-19 ms for the ops above and
  the transposed copy of dW_enc (``native_backward.c``; the ops above stay the fallback and the reference).
- Encoder backward, dx = S W_encᵀ: ``embedding_bag`` over the rows of W_encᵀ (only when x requires grad);
  db_enc: ``index_add_``; with ``b_pre`` (x - b_pre is encoded) db_pre = -W_enc · db_enc, a matrix-vector
  product, so an SAE's tied pre-encoder bias needs no [N, d_in] gradient.
- BatchTopK: a flat ``topk`` over N*d_sae is ~250 ms on CPU, so an exact threshold search is used instead
  (``_batch_topk_flat``).
- Index bookkeeping (CSR row pointer, the by-column order) is computed once per sparsity pattern and shared by the
  decoder forward/backward and the encoder backward (``_Plan``, cached on the pattern's ``cols`` tensor).

- CPU buffers (``buffers``, :mod:`saeforge.kernels.buffers`): the compiled backward writes both weight gradients,
  and the forward ``x - b_pre`` and the bfloat16 casts of x and W_enc, into tensors reused from step to step (fresh
  ones page-faulted every step); the same ops, so the same bits.

Measured on the benchmark shape: encoder GEMM ~100 ms, selection ~2-5 ms, the sparse backward ~7 ms; a whole
saeforge TopK training step ~123-130 ms, ~80 % of the bare float32 ``addmm`` into a reused buffer (bfloat16
encoder: ~47-50 ms, ~52-53 % of its GEMM); ``benchmarks/train_step.py``, ``benchmarks/train_step_floor.py`` and
docs/architecture.md ("Where the TopK train step's time goes").

Semantics decided here (the reference path implements the same, the tests hold both to it):

- Selection is on the pre-ReLU pre-activations, the ReLU is applied to the selected values (OpenAI's order). ReLU
  is monotone, so the values are those of top-k over ReLU(pre); only which zero-valued entries get listed could
  differ, and they carry no output and no gradient.
- TopK and AuxK keep a fixed number of entries per row (zeros included); BatchTopK drops zero values.
- AuxK: per row the top ``min(aux_k, #dead)`` pre-activations among dead latents, ReLU after the selection.
- Both implementations compute the pre-activations with the same ``addmm`` call and select with the same
  functions, so they list identical latents even where values tie (bfloat16 ties often); the tests check the
  selections against independent brute-force definitions.

All ops used exist on CUDA as well (``sampled_addmm`` needs a CSR pattern with sorted columns, which is why the
latents are kept in canonical order; the CPU-only tricks — workspace, two-level top-k — are skipped there). The CUDA
path has not been run yet: the tests parametrize over CUDA when it is present. With ``matmul_dtype=torch.bfloat16`` only the encoder GEMM runs in bfloat16
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

from saeforge.kernels import native
from saeforge.kernels.buffers import StepBuffers

# The CSR patterns below are internal and valid by construction; silence torch's one-off "beta" notice about them.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

__all__ = ["SparseLatents", "encode_topk", "decode_sparse", "decode_sparse_blocks", "clear_workspace"]

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
    # the selected pre-activations (before ReLU, in the pre-activation dtype), in the same order
    pre_values: Tensor
    # True when every row holds exactly the same number of entries (TopK, AuxK)
    fixed_per_row: bool


def _flat(sel: _Selection, d_sae: int) -> Tensor:
    return sel.rows * d_sae + sel.cols


def _row_major(idx: Tensor, vals: Tensor, n_rows: int, col_map: Tensor | None = None) -> _Selection:
    """[N, k] column indices and their values -> canonical selection (rows ascending, cols ascending per row)."""
    if col_map is not None:
        idx = col_map[idx]
    idx, order = idx.sort(dim=1)
    vals = vals.gather(1, order)
    kk = idx.shape[1]
    rows = torch.arange(n_rows, device=idx.device).repeat_interleave(kk)
    return _Selection(rows, idx.reshape(-1), vals.reshape(-1), True)


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
        if 16 * k <= d_sae:  # the compiled kernel's condition (k at most one per group of 16)
            found = native.topk_rows(pre, k)  # None without a C compiler (or for rows holding NaN)
            if found is not None:  # already in canonical order
                vals, idx = found
                rows = torch.arange(n, device=pre.device).repeat_interleave(k)
                return _Selection(rows, idx.reshape(-1), vals.reshape(-1), True)
        vals, idx = _topk_rows(pre, k)
        return _row_major(idx, vals, n)
    flat = _batch_topk_flat(pre, n * k)
    return _Selection(torch.div(flat, d_sae, rounding_mode="floor"), flat % d_sae,
                      pre.reshape(-1).index_select(0, flat), False)


_CHUNK = 16  # 16 float32 = one cache line


def _topk_rows(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-row top-k (values, column indices), unsorted; the same set as ``pre.topk(k, dim=1)`` up to ties.

    On CPU, ``torch.topk`` over a long row costs ~1.3 ns per element (it copies every (value, index) pair before
    its partial sort), ~25 ms at 4096 x 4608. Two-level selection instead: the maxima of contiguous chunks of 16
    (``max_pool1d``, one pass at memory speed), the k chunks with the largest maxima, then top-k over just those
    k*16 candidates. Exact: the k chosen maxima are k elements >= t (the smallest of them), so the k-th largest
    element is >= t, while every element of an unchosen chunk is <= its maximum <= t — it can at most tie.
    """
    n, m = pre.shape
    c = _CHUNK
    if pre.device.type != "cpu" or pre.dtype != torch.float32 or m % c or k * c * 4 > m or n == 0:
        return pre.topk(k, dim=1, sorted=False)
    s = m // c
    chunk_max = F.max_pool1d(pre.unsqueeze(1), c).squeeze(1)  # [n, s]
    chunk = chunk_max.topk(k, dim=1, sorted=False).indices  # [n, k]
    rows_base = torch.arange(n, device=pre.device).unsqueeze(1) * s
    cand = pre.reshape(n * s, c).index_select(0, (chunk + rows_base).reshape(-1)).view(n, k * c)
    vals, j = cand.topk(k, dim=1, sorted=False)
    return vals, chunk.gather(1, torch.div(j, c, rounding_mode="floor")) * c + j % c


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
        vals, idx = pre.topk(ka, dim=1, sorted=False)
        return _row_major(idx, vals, n)
    vals, idx = pre.index_select(1, dead).topk(ka, dim=1, sorted=False)
    return _row_major(idx, vals, n, col_map=dead)


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


def _encode_reference(x, W_enc, b_enc, k, batch, aux_k, aux_mask, matmul_dtype, b_pre):
    """Plain PyTorch: dense pre-activations, torch.topk, dense masked latents; autograd does the rest."""
    n, d_sae = x.shape[0], W_enc.shape[1]
    pre = _linear_pre(x if b_pre is None else x - b_pre, W_enc, b_enc, matmul_dtype)
    acts = torch.relu(pre).to(W_enc.dtype)  # [N, d_sae], differentiable

    def gather(sel: _Selection) -> SparseLatents:
        mask = torch.zeros(n * d_sae, dtype=torch.bool, device=x.device)
        mask[_flat(sel, d_sae)] = True
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


class _Plan:
    """Index bookkeeping for one sparsity pattern (rows, cols), each piece computed at most once.

    The decoder's forward and backward and the encoder's backward all work on the same pattern, so the pieces are
    shared: the plan is attached to the pattern's ``cols`` tensor (attribute ``_saeforge_plan``) and kept in the
    autograd contexts. It is checked against the identity, shape and version counters of ``rows``/``cols``, so a
    hand-made or modified pattern never picks up a stale plan.
    """

    __slots__ = ("rows", "n_rows", "n_cols", "rows_version", "cols_version", "_crow", "_csc", "_order")

    def __init__(self, rows: Tensor, cols: Tensor, n_rows: int, n_cols: int, per_row: int | None = None):
        self.rows, self.n_rows, self.n_cols = rows, n_rows, n_cols
        self.rows_version, self.cols_version = rows._version, cols._version
        self._csc: tuple[Tensor, Tensor, Tensor] | None = None
        self._order: tuple[Tensor, Tensor] | None | bool = None  # False: the compiled kernels do not apply
        self._crow: Tensor | None = None
        if per_row is not None:  # TopK / AuxK: exactly per_row entries in every row
            self._crow = torch.arange(0, n_rows * per_row + 1, per_row, device=rows.device)

    @staticmethod
    def of(rows: Tensor, cols: Tensor, n_rows: int, n_cols: int) -> "_Plan":
        p = getattr(cols, "_saeforge_plan", None)
        if (isinstance(p, _Plan) and p.rows is rows and p.n_rows == n_rows and p.n_cols == n_cols
                and p.rows_version == rows._version and p.cols_version == cols._version):
            return p
        p = _Plan(rows, cols, n_rows, n_cols)
        cols._saeforge_plan = p
        return p

    def crow(self) -> Tensor:
        """CSR row pointer [N + 1] (rows must be sorted)."""
        if self._crow is None:
            counts = torch.bincount(self.rows, minlength=self.n_rows)
            self._crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return self._crow

    def row_offsets(self) -> Tensor:
        """Start of each row's run, the ``offsets`` of ``embedding_bag`` [N]."""
        return self.crow()[:-1]

    def csc(self, cols: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(perm, col_offsets [n_cols], rows[perm]): the entries sorted by column (stable), one bag per column."""
        if self._csc is None:
            order = self.native_order(cols)
            if order is not None:  # the same stable order by a counting sort
                col_start, perm = order
                self._csc = (perm, col_start[:-1], self.rows[perm])
            else:
                cols_sorted, perm = cols.sort(stable=True)
                counts = torch.bincount(cols_sorted, minlength=self.n_cols)
                self._csc = (perm, counts.cumsum(0) - counts, self.rows[perm])
        return self._csc

    def native_order(self, cols: Tensor) -> tuple[Tensor, Tensor] | None:
        """(col_start [n_cols + 1], perm): the entries grouped by column for the compiled backward kernels
        (:func:`saeforge.kernels.native.csc_order`); None where they do not apply (no compiler, CUDA)."""
        if self._order is None:
            self._order = False
            if cols.device.type == "cpu" and self.rows.device.type == "cpu":
                self._order = native.csc_order(cols, self.n_cols) or False
        return self._order or None


def _sparse_t_matmul(plan: _Plan, cols: Tensor, weights: Tensor, dense: Tensor) -> Tensor:
    """Sᵀ @ dense -> [n_cols, dense.shape[1]] for S = COO(rows, cols, weights) of shape [dense.shape[0], n_cols].

    One bag per column of S: the entries sorted by column, then ``embedding_bag`` over the rows of ``dense`` with
    the weights as per-sample weights.
    """
    if cols.numel() == 0:
        return dense.new_zeros(plan.n_cols, dense.shape[1])
    perm, offsets, rows_by_col = plan.csc(cols)
    return F.embedding_bag(rows_by_col, dense, offsets, mode="sum", per_sample_weights=weights[perm].to(dense.dtype))


def _sparse_matmul(plan: _Plan, cols: Tensor, weights: Tensor, dense: Tensor) -> Tensor:
    """S @ dense -> [n_rows, dense.shape[1]] for a row-sorted S (``embedding_bag``, one bag per row)."""
    if cols.numel() == 0:
        return dense.new_zeros(plan.n_rows, dense.shape[1])
    return F.embedding_bag(cols, dense, plan.row_offsets(), mode="sum", per_sample_weights=weights.to(dense.dtype))


def _sampled_dots(plan: _Plan, cols: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """out[e] = a[rows[e]] · b[cols[e]] for a canonical (row-sorted, column-sorted within rows) pattern."""
    if cols.numel() == 0:
        return a.new_zeros(0)
    if a.dtype in (torch.float32, torch.float64):
        pattern = torch.sparse_csr_tensor(plan.crow(), cols, a.new_zeros(cols.numel()),  # beta*0, not beta*garbage
                                          size=(plan.n_rows, plan.n_cols), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, a, b.t(), beta=0.0).values()
    # sampled_addmm has no CPU kernel for half/bfloat16 (and cuSPARSE's support varies): compute in float32
    return _sampled_dots(plan, cols, a.float(), b.float()).to(a.dtype)


def _attach_plan(sel: _Selection, n_rows: int, n_cols: int) -> _Plan:
    per_row = sel.cols.numel() // n_rows if (sel.fixed_per_row and n_rows > 0) else None
    plan = _Plan(sel.rows, sel.cols, n_rows, n_cols, per_row)
    sel.cols._saeforge_plan = plan
    return plan


def _native_encode_backward(xm: Tensor, parts, d_sae: int, need_db: bool, dtype: torch.dtype,
                            buffers: StepBuffers | None) -> tuple[Tensor, Tensor | None] | None:
    """dW_enc [d_in, d_sae] (the parameter's layout) and db [d_sae] summed over the selections ``parts`` (plan,
    cols, gradient at the entries) by the compiled kernel, dW_enc into a reused buffer of ``buffers`` when given;
    None where it does not apply (the PyTorch path then)."""
    if dtype != torch.float32 or xm.device.type != "cpu":
        return None
    dW = db = None
    for pl, c, gp in parts:
        order = pl.native_order(c)
        out = None
        if buffers is not None and dW is None:  # the first part's result becomes the gradient; the others add to it
            out = buffers.get(("dW_enc", xm.shape[1], d_sae), torch.Size((xm.shape[1], d_sae)), torch.float32,
                              xm.device)
        found = None if order is None else native.encode_backward(xm, gp.contiguous(), pl.rows, order, d_sae,
                                                                  db=need_db, out_dW=out)
        if found is None:
            return None
        dW = found[0] if dW is None else dW.add_(found[0])
        if need_db:
            db = found[1] if db is None else db.add_(found[1])
    return dW, db


def _scratch(buffers: StepBuffers | None, key: str, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A tensor shaped as ``like`` (in ``dtype``, default like's) that the caller overwrites whole: a reused buffer of
    ``buffers`` when given (on CPU, while nothing else holds it), a fresh tensor otherwise."""
    dtype = like.dtype if dtype is None else dtype
    if buffers is None or like.device.type != "cpu":
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    return buffers.get((key, *like.shape), like.shape, dtype, like.device)


class _EncodeFn(torch.autograd.Function):
    """Sparse TopK / BatchTopK (+ AuxK) encoder: dense GEMM forward, backward only through the selected entries."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_pre, k, batch, aux_k, aux_mask, matmul_dtype, buffers):
        n, d_sae = x.shape[0], W_enc.shape[1]
        dtype = W_enc.dtype
        low = matmul_dtype is not None and matmul_dtype != dtype
        # the same ops as the reference's, so the same bits; the [N, d_in] and [d_in, d_sae] results in reused
        # buffers when given (fresh ones cost ~3 ms a step in page faults with a bfloat16 GEMM at the benchmark shape)
        xc = x if b_pre is None else torch.sub(x, b_pre, out=_scratch(buffers, "x - b_pre", x))
        if low:
            xm = _scratch(buffers, "x in the matmul dtype", xc, matmul_dtype).copy_(xc)
            Wm = _scratch(buffers, "W_enc in the matmul dtype", W_enc, matmul_dtype).copy_(W_enc)
            bm = b_enc.to(matmul_dtype)
        else:
            xm, Wm, bm = xc, W_enc, b_enc
        pre = _workspace((n, d_sae), xm.dtype, x.device)
        torch.addmm(bm, xm, Wm, out=pre)  # the same op as _linear_pre, so the same bits as the reference

        sel = _select(pre, k, batch)
        sel_aux = _select_aux(pre, aux_k, aux_mask)
        del pre  # the workspace is free again: nothing below or in the backward needs the dense pre-activations

        values = sel.pre_values.relu().to(dtype)
        plan = _attach_plan(sel, n, d_sae)
        if sel_aux is not None:
            aux_values = sel_aux.pre_values.relu().to(dtype)
            aux_rows, aux_cols = sel_aux.rows, sel_aux.cols
            aux_plan = _attach_plan(sel_aux, n, d_sae)
        else:
            aux_values = values.new_empty(0)
            aux_rows = aux_cols = sel.rows.new_empty(0)
            aux_plan = None

        ctx.n, ctx.d_sae, ctx.dtype, ctx.buffers = n, d_sae, dtype, buffers
        ctx.plans = (plan, aux_plan)  # rows/cols are non-differentiable outputs: no reference cycle
        # dW_enc needs x (as the GEMM saw it); dx and db_pre need W_enc
        need_W = ctx.needs_input_grad[0] or ctx.needs_input_grad[3]
        ctx.save_for_backward(xm if ctx.needs_input_grad[1] else None, Wm if need_W else None,
                              values, sel.cols, aux_values, aux_cols)
        ctx.mark_non_differentiable(sel.rows, sel.cols, aux_rows, aux_cols)
        return values, sel.rows, sel.cols, aux_values, aux_rows, aux_cols

    @staticmethod
    @once_differentiable
    def backward(ctx, g_values, _g_rows, _g_cols, g_aux, _g_arows, _g_acols):
        # detached: embedding_bag picks its cheaper forward-only kernel when the weight does not require grad
        xm, Wm, values, cols, aux_values, aux_cols = (t.detach() if t is not None else None for t in ctx.saved_tensors)
        plan, aux_plan = ctx.plans
        # d/dpre of the ReLU at the selected entries (values > 0 <=> pre > 0)
        parts = [(plan, cols, g_values * (values > 0))]
        if aux_plan is not None:
            parts.append((aux_plan, aux_cols, g_aux * (aux_values > 0)))
        dx = dW = db = None
        need_db = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        if ctx.needs_input_grad[1]:  # dW_enc and db in one compiled pass per selection, where it applies
            found = _native_encode_backward(xm, parts, ctx.d_sae, need_db, ctx.dtype, ctx.buffers)
            if found is not None:
                dW, db = found
        if ctx.needs_input_grad[0]:  # dx = S W_encᵀ
            Wt = Wm.t().contiguous().to(ctx.dtype)
            for pl, c, gp in parts:
                d = _sparse_matmul(pl, c, gp, Wt)
                dx = d if dx is None else dx.add_(d)
        if ctx.needs_input_grad[1] and dW is None:  # dW_enc = xᵀ S = (Sᵀ x)ᵀ
            xd = xm.to(ctx.dtype)
            for pl, c, gp in parts:
                d = _sparse_t_matmul(pl, c, gp, xd)
                dW = d if dW is None else dW.add_(d)
            dW = dW.t()
        db_pre = None
        if need_db:
            if db is None:
                db = values.new_zeros(ctx.d_sae)
                for _, c, gp in parts:
                    db.index_add_(0, c, gp)
            if ctx.needs_input_grad[3]:  # pre = (x - b_pre) W + b  =>  dL/db_pre = -W · dL/db
                wide = native.matvec_bf16(Wm, db) if Wm.dtype == torch.bfloat16 and db.dtype == torch.float32 else None
                db_pre = -(Wm.to(ctx.dtype) @ db) if wide is None else wide.neg_()
            if not ctx.needs_input_grad[2]:
                db = None
        return dx, dW, db, db_pre, None, None, None, None, None, None


class _DecodeFn(torch.autograd.Function):
    """``dense(latents) @ W_dec`` touching only the stored entries, forward and backward."""

    @staticmethod
    def forward(ctx, values, rows, cols, n, W_dec, buffers):
        plan = _Plan.of(rows, cols, n, W_dec.shape[0])
        out = _sparse_matmul(plan, cols, values.detach(), W_dec.detach())  # detached: forward-only embedding_bag
        ctx.plan, ctx.buffers = plan, buffers
        ctx.save_for_backward(values, cols, W_dec)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        values, cols, W_dec = (t.detach() for t in ctx.saved_tensors)
        g = g.contiguous()
        need_dv, need_dW = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        order = ctx.plan.native_order(cols) if g.device.type == "cpu" else None
        if order is not None:  # both in one compiled pass over the entries, where it applies
            out = None
            if need_dW and ctx.buffers is not None and W_dec.dtype == torch.float32:
                out = ctx.buffers.get(("dW_dec", *W_dec.shape), W_dec.shape, torch.float32, W_dec.device)
            found = native.decode_backward(g, W_dec, values, ctx.plan.rows, order, dv=need_dv, dW=need_dW,
                                           out_dW=out)
            if found is not None:
                return found[0], None, None, None, found[1], None
        dv = dW = None
        if need_dv:
            dv = _sampled_dots(ctx.plan, cols, g, W_dec).to(values.dtype)
        if need_dW:
            dW = _sparse_t_matmul(ctx.plan, cols, values, g)
        return dv, None, None, None, dW, None


class _DecodeBlocksFn(torch.autograd.Function):
    """``dense(latents) @ W[:, b]`` for every block b of W [d_sae, B, d_out], one output per block, each through
    the same kernels as ``_DecodeFn`` on the [d_sae, d_out] slice: each pass keeps the working set of one slice
    (a whole row of W is B·d_out wide, and gathering such rows is measured 2x slower on CPU than B narrow passes)."""

    @staticmethod
    def forward(ctx, values, rows, cols, n, W):
        plan = _Plan.of(rows, cols, n, W.shape[0])
        v, Wd = values.detach(), W.detach()
        ctx.plan = plan
        ctx.save_for_backward(values, cols, W)
        return tuple(_sparse_matmul(plan, cols, v, Wd[:, b]) for b in range(W.shape[1]))

    @staticmethod
    @once_differentiable
    def backward(ctx, *gs):
        values, cols, W = (t.detach() for t in ctx.saved_tensors)
        gs = [g.contiguous() for g in gs]
        dv = dW = None
        if ctx.needs_input_grad[0]:
            for b, g in enumerate(gs):
                d = _sampled_dots(ctx.plan, cols, g, W[:, b])
                dv = d if dv is None else dv.add_(d)
            dv = dv.to(values.dtype)
        if ctx.needs_input_grad[4]:
            dW = torch.stack([_sparse_t_matmul(ctx.plan, cols, values, g) for g in gs], 1)
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
    b_pre: Tensor | None = None,
    buffers: StepBuffers | None = None,
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
    - ``b_pre`` (optional, [d_in], an addition to the API): encode ``x - b_pre`` (the tied pre-encoder bias,
      ``b_dec`` in most SAEs). Same result as passing ``x - b_pre`` yourself, but cheaper to train: the fast path
      gets dL/db_pre = -W_enc · dL/db_enc from a matrix-vector product instead of back-propagating a full
      [N, d_in] gradient through x (about 4 ms of a 160 ms step at the benchmark shape).
    - ``buffers`` (optional, CPU): the compiled backward writes dW_enc into a buffer of it reused from step to step
      (:mod:`saeforge.kernels.buffers`) instead of a fresh tensor.
    """
    _check_impl(impl)
    _check_encode_args(x, W_enc, b_enc, k)
    if b_pre is not None and (b_pre.shape != (x.shape[1],) or b_pre.dtype != x.dtype):
        raise ValueError(f"b_pre must be a [{x.shape[1]}] {x.dtype} tensor, got {b_pre.dtype} {tuple(b_pre.shape)}")
    if impl == "reference":
        return _encode_reference(x, W_enc, b_enc, k, batch, aux_k, aux_mask, matmul_dtype, b_pre)
    n, d_sae = x.shape[0], W_enc.shape[1]
    has_aux = aux_k > 0 and aux_mask is not None and bool(aux_mask.any())  # (_select_aux validates the mask)
    values, rows, cols, aux_values, aux_rows, aux_cols = _EncodeFn.apply(
        x, W_enc, b_enc, b_pre, k, batch, aux_k if has_aux else 0, aux_mask if has_aux else None, matmul_dtype,
        buffers)
    main = SparseLatents(values, rows, cols, (n, d_sae))
    if not has_aux:
        return main, None
    return main, SparseLatents(aux_values, aux_rows, aux_cols, (n, d_sae))


def decode_sparse(latents: SparseLatents, W_dec: Tensor, *, impl: str = "fast",
                  buffers: StepBuffers | None = None) -> Tensor:
    """``dense(latents) @ W_dec`` -> [N, d_out] (no bias). W_dec: [d_sae, d_out].

    ``latents.rows`` must be sorted ascending (as ``encode_topk`` returns them, and as any boolean filtering of them
    keeps them); the fast path also wants ``cols`` ascending within a row (the CSR order ``sampled_addmm`` needs
    on CUDA). Gradients: to ``values`` (the selected dot products only) and to ``W_dec`` (only the rows used);
    with ``buffers`` (CPU) the compiled backward writes dW_dec into a buffer of it reused from step to step.
    """
    _check_impl(impl)
    if W_dec.dim() != 2 or W_dec.shape[0] != latents.shape[1]:
        raise ValueError(f"W_dec must be [d_sae={latents.shape[1]}, d_out], got {tuple(W_dec.shape)}")
    if impl == "reference":
        return latents.to_dense().to(W_dec.dtype) @ W_dec
    return _DecodeFn.apply(latents.values, latents.rows, latents.cols, latents.shape[0], W_dec, buffers)


def decode_sparse_blocks(latents: SparseLatents, W_dec: Tensor, *, impl: str = "fast") -> tuple[Tensor, ...]:
    """``dense(latents) @ W_dec[:, b]`` for each block b of ``W_dec`` [d_sae, B, d_out] -> B tensors [N, d_out]:
    a decoder writing several outputs (a cross-layer transcoder's, into its own and later layers), decoded one
    output at a time. The same result as ``decode_sparse(latents, W_dec.reshape(d_sae, -1))`` split by block, and
    faster on CPU for wide rows (see ``_DecodeBlocksFn``). Gradients as :func:`decode_sparse`."""
    _check_impl(impl)
    if W_dec.dim() != 3 or W_dec.shape[0] != latents.shape[1]:
        raise ValueError(f"W_dec must be [d_sae={latents.shape[1]}, blocks, d_out], got {tuple(W_dec.shape)}")
    if impl == "reference":
        dense = latents.to_dense().to(W_dec.dtype)
        return tuple(dense @ W_dec[:, b] for b in range(W_dec.shape[1]))
    return _DecodeBlocksFn.apply(latents.values, latents.rows, latents.cols, latents.shape[0], W_dec)
