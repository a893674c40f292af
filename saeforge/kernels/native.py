"""Optional compiled CPU kernels (``native_topk.c``): built with the system C compiler on first use, loaded with
ctypes, and run on ``torch.get_num_threads()`` Python threads (ctypes releases the GIL during the call).

Nothing depends on them: without a compiler (or with ``SAEFORGE_NATIVE_KERNELS=0``) :func:`topk_rows` returns None
and the callers keep their plain-PyTorch path, which the tests hold the native one to. The shared library is
cached under ``~/.cache/saeforge/kernels`` (``SAEFORGE_CACHE`` moves it), keyed by the source, the compiler flags
and the CPU's instruction-set flags (it is built with ``-march=native``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "topk_rows"]

_SOURCE = Path(__file__).with_name("native_topk.c")
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c99"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _forget_pool_in_child() -> None:
    # a forked child inherits the pool object but not its threads: work submitted to it would wait forever
    global _pool, _pool_size, _lock
    _pool, _pool_size, _lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


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


def _build() -> ctypes.CDLL | bool:
    if os.environ.get("SAEFORGE_NATIVE_KERNELS", "1") == "0":
        return False
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return False
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join([cc, *_FLAGS]).encode() + _cpu_flags().encode())
    lib = _cache_dir() / f"native_topk-{key.hexdigest()[:16]}.so"
    try:
        if not lib.is_file():
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
                out = Path(tmp) / lib.name
                subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", str(out)], check=True, capture_output=True,
                               timeout=120)
                os.replace(out, lib)  # atomic: a concurrent builder's copy is identical
        so = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError):
        return False
    for name in ("topk_rows_f32", "topk_rows_bf16"):
        fn = getattr(so, name)
        fn.restype = ctypes.c_int64
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_void_p, ctypes.c_void_p]
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


def _run_split(fn, n: int, *args) -> int:
    """``fn(*args[:3], r0, r1, *args[3:])`` over row ranges on ``torch.get_num_threads()`` threads; the sum of
    what the calls return."""
    global _pool, _pool_size
    threads = max(1, min(torch.get_num_threads(), n // 64 or 1))
    if threads == 1:
        return fn(*args[:3], 0, n, *args[3:])
    with _lock:
        if _pool is None or _pool_size < threads:
            _pool, _pool_size = ThreadPoolExecutor(threads, thread_name_prefix="saeforge-native"), threads
        pool = _pool
    bounds = [n * i // threads for i in range(threads + 1)]
    futures = [pool.submit(fn, *args[:3], bounds[i], bounds[i + 1], *args[3:]) for i in range(threads)]
    return sum(f.result() for f in futures)


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
        if _run_split(fn, n, pre.data_ptr(), m, k, idx.data_ptr(), val.data_ptr()):
            return None  # rows with NaN (or k > m / 16): the caller's PyTorch path decides
    return val.to(pre.dtype), idx
