"""Optional compiled CPU kernels (``native_topk.c``: the per-row top-k; ``native_backward.c``: the sparse weight
gradients): built with the system C compiler on first use, loaded with ctypes (which releases the GIL during the
call), and split over ``torch.get_num_threads()`` threads by OpenMP — the process's OpenMP runtime, i.e. the
``libgomp`` torch has already loaded, so the kernels and torch's own ops share one thread pool instead of a second
pool competing with OpenMP threads that are still spinning after a torch op (measured: a Python thread pool next to
them ran the top-k at a third of its speed).

Nothing depends on them: without a compiler (or with ``SAEFORGE_NATIVE_KERNELS=0``) every function here returns
None and the callers keep their plain-PyTorch path, which the tests hold the native one to. Built without OpenMP
(a compiler without it) the kernels run on one thread; so they do in a forked child (a forked OpenMP pool can
hang). The shared library is cached under ``~/.cache/saeforge/kernels`` (``SAEFORGE_CACHE`` moves it), keyed by
the sources, the compiler flags and the CPU's instruction-set flags (it is built with ``-march=native``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "csc_order", "decode_backward", "encode_backward", "matvec_bf16", "project_rows_", "topk_rows"]

_SOURCES = [Path(__file__).with_name(name) for name in ("native_topk.c", "native_backward.c")]
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c99"]
_OPENMP = "-fopenmp"
_lock = threading.Lock()
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable
_forked = False  # in a forked child: one thread (a forked OpenMP pool can hang)


def _serial_in_child() -> None:
    global _forked, _lock
    _forked, _lock = True, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_serial_in_child)


def _cache_dir() -> Path:
    root = os.environ.get("SAEFORGE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "saeforge") / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "topk_rows_f32": [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64],
    "topk_rows_bf16": [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64],
    "csc_order": [_PTR, _I64, _I64, _PTR, _PTR],
    "decode_backward_f32": [_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _I64],
    "encode_backward_f32": [_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _I64],
    "encode_backward_bf16": [_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _I64],
    "project_rows_f32": [_PTR, _PTR, _I64, _I64, _I64],
    "matvec_bf16": [_PTR, _PTR, _I64, _I64, _PTR, _I64],
    "native_openmp": [],
}


def _compile(cc: str, flags: list[str], lib: Path) -> None:
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        subprocess.run([cc, *flags, *map(str, _SOURCES), "-o", str(out)], check=True, capture_output=True,
                       timeout=120)
        os.replace(out, lib)  # atomic: a concurrent builder's copy is identical


def _build() -> ctypes.CDLL | bool:
    if os.environ.get("SAEFORGE_NATIVE_KERNELS", "1") == "0":
        return False
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return False
    so = None
    for flags in ([*_FLAGS, _OPENMP], _FLAGS):  # without OpenMP if the compiler has none: one thread
        key = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES) + " ".join([cc, *flags]).encode()
                             + _cpu_flags().encode())
        lib = _cache_dir() / f"native_kernels-{key.hexdigest()[:16]}.so"
        try:
            if not lib.is_file():
                _compile(cc, flags, lib)
            so = ctypes.CDLL(str(lib))
            break
        except (OSError, subprocess.SubprocessError):
            continue
    if so is None:
        return False
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(so, name)
        fn.restype, fn.argtypes = _I64, argtypes
    return so


def _library() -> ctypes.CDLL | None:
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                _lib = _build()
    return _lib or None


def available() -> bool:
    """Whether the compiled kernels are built (or can be) and enabled."""
    return _library() is not None


def _threads() -> int:
    return 1 if _forked else max(1, torch.get_num_threads())


def topk_rows(pre: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """Per-row top-k of a contiguous CPU float32 / bfloat16 [n, m] tensor: (values [n, k] in ``pre``'s dtype,
    column indices [n, k] int64), each row's entries sorted by column; the same values as ``pre.topk(k, dim=1)``
    (among ties the earliest columns). None when the compiled kernel is not available or does not apply."""
    if (pre.device.type != "cpu" or pre.dim() != 2 or pre.dtype not in (torch.float32, torch.bfloat16)
            or not pre.is_contiguous() or not 1 <= k <= pre.shape[1]):
        return None
    lib = _library()
    if lib is None:
        return None
    n, m = pre.shape
    idx = torch.empty(n, k, dtype=torch.int64)
    val = torch.empty(n, k, dtype=torch.float32)
    if n:
        fn = lib.topk_rows_f32 if pre.dtype == torch.float32 else lib.topk_rows_bf16
        if fn(pre.data_ptr(), m, k, 0, n, idx.data_ptr(), val.data_ptr(), _threads() if n >= 64 else 1):
            return None  # rows with NaN (or k > m / 16): the caller's PyTorch path decides
    return val.to(pre.dtype), idx


def _cpu_contiguous(*ts: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in ts)


def csc_order(cols: Tensor, m: int) -> tuple[Tensor, Tensor] | None:
    """The entries of a sparse pattern grouped by column, stable (a counting sort): (col_start [m + 1], perm
    [nnz]), the entry ids of column j being ``perm[col_start[j]:col_start[j + 1]]`` in their original order. The
    same as ``cols.sort(stable=True)`` (perm) and the cumulative counts. None when the kernels are unavailable."""
    if not (_cpu_contiguous(cols) and cols.dtype == torch.int64 and cols.dim() == 1):
        return None
    lib = _library()
    if lib is None:
        return None
    col_start = torch.empty(m + 1, dtype=torch.int64)
    perm = torch.empty(cols.numel(), dtype=torch.int64)
    if lib.csc_order(cols.data_ptr(), cols.numel(), m, col_start.data_ptr(), perm.data_ptr()):
        return None  # a column out of range: the PyTorch path raises its own error
    return col_start, perm


def _out(out: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    """``out`` (a contiguous float32 CPU tensor of ``shape`` that the kernel overwrites whole) or a new one."""
    if out is None:
        return torch.empty(shape, dtype=torch.float32)
    if not (_cpu_contiguous(out) and out.dtype == torch.float32 and tuple(out.shape) == shape):
        raise ValueError(f"out must be a contiguous float32 CPU tensor of shape {shape}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    return out


def decode_backward(g: Tensor, W_dec: Tensor, values: Tensor, rows: Tensor, order: tuple[Tensor, Tensor], *,
                    dv: bool, dW: bool, out_dW: Tensor | None = None) -> tuple[Tensor | None, Tensor | None] | None:
    """For ``out = S @ W_dec`` (S: the entries (rows, cols, values), ``order`` = :func:`csc_order` of its cols) and
    the output gradient ``g`` [n, d]: (dv [nnz] = g[rows[e]] · W_dec[cols[e]], dW_dec [m, d] = Sᵀ g), each only
    when asked, in one pass over the entries by column; dW_dec into ``out_dW`` when given (every entry is
    written). float32 CPU tensors; None when the kernel does not apply."""
    col_start, perm = order
    m, d = W_dec.shape
    if (not (dv or dW) or not _cpu_contiguous(g, W_dec, values, rows, col_start, perm)
            or {g.dtype, W_dec.dtype, values.dtype} != {torch.float32} or g.shape[1] != d
            or rows.dtype != torch.int64 or col_start.numel() != m + 1):
        return None
    lib = _library()
    if lib is None:
        return None
    out_dv = torch.empty(values.numel(), dtype=torch.float32) if dv else None
    out_dW = _out(out_dW, (m, d)) if dW else None
    lib.decode_backward_f32(g.data_ptr(), W_dec.data_ptr(), values.data_ptr(), rows.data_ptr(), perm.data_ptr(),
                            col_start.data_ptr(), m, d, out_dv.data_ptr() if dv else None,
                            out_dW.data_ptr() if dW else None, _threads())
    return out_dv, out_dW


def encode_backward(x: Tensor, gp: Tensor, rows: Tensor, order: tuple[Tensor, Tensor], m: int, *,
                    db: bool, out_dW: Tensor | None = None) -> tuple[Tensor, Tensor | None] | None:
    """For pre-activations ``x @ W_enc`` [n, m] and the gradient ``gp`` [nnz] at the entries (rows, cols) (``order``
    = :func:`csc_order` of cols): (dW_enc [d, m] = xᵀ S, contiguous in the parameter's layout; db [m] = the column
    sums of S, when asked), in one pass over the entries by column; dW_enc into ``out_dW`` when given (every
    entry is written). ``x`` float32 or bfloat16 (widened exactly),
    ``gp`` float32; None when the kernel does not apply."""
    col_start, perm = order
    if (not _cpu_contiguous(x, gp, rows, col_start, perm) or x.dim() != 2
            or x.dtype not in (torch.float32, torch.bfloat16) or gp.dtype != torch.float32
            or rows.dtype != torch.int64 or col_start.numel() != m + 1):
        return None
    lib = _library()
    if lib is None:
        return None
    d = x.shape[1]
    out_dW = _out(out_dW, (d, m))
    out_db = torch.empty(m, dtype=torch.float32) if db else None
    fn = lib.encode_backward_f32 if x.dtype == torch.float32 else lib.encode_backward_bf16
    if fn(x.data_ptr(), gp.data_ptr(), rows.data_ptr(), perm.data_ptr(), col_start.data_ptr(), m, d,
          out_dW.data_ptr(), out_db.data_ptr() if db else None, _threads()):
        return None  # out of memory for the per-thread tiles
    return out_dW, out_db


def project_rows_(g: Tensor, W: Tensor) -> bool:
    """In place: remove from each row of ``g`` [m, d] its component along the same row of ``W`` (the gradient
    projection of a unit-norm decoder), ``g_r -= (g_r · W_r) / max(|W_r|², 1e-24) W_r``, in one pass; each row by one
    thread in a fixed order, so the result does not depend on the thread count. False (and ``g`` untouched) when
    the kernel does not apply: the caller then runs its PyTorch projection."""
    if not (_cpu_contiguous(g, W) and g.dtype == W.dtype == torch.float32 and g.dim() == 2 and g.shape == W.shape):
        return False
    lib = _library()
    if lib is None:
        return False
    lib.project_rows_f32(g.data_ptr(), W.data_ptr(), g.shape[0], g.shape[1], _threads())
    return True


def matvec_bf16(W: Tensor, v: Tensor) -> Tensor | None:
    """``W.float() @ v`` for a bfloat16 ``W`` [d, m] and a float32 ``v`` [m], without the float32 copy of ``W``
    (~1.2 ms a step at the benchmark shape, mostly page faults); None when the kernel does not apply."""
    if not (_cpu_contiguous(W, v) and W.dtype == torch.bfloat16 and v.dtype == torch.float32 and W.dim() == 2
            and v.shape == (W.shape[1],)):
        return None
    lib = _library()
    if lib is None:
        return None
    out = torch.empty(W.shape[0], dtype=torch.float32)
    if lib.matvec_bf16(W.data_ptr(), v.data_ptr(), W.shape[0], W.shape[1], out.data_ptr(), _threads()):
        return None
    return out
