"""Buffers reused from step to step for a training step's large per-step tensors (CPU).

Why: on CPU a fresh tensor of tens of MB is a fresh mapping (glibc maps anything above its mmap threshold anew and
returns it on free), and its page faults, or writing it cold, cost more than the work that fills it: at the TopK
benchmark shape (``benchmarks/train_step.py``) each fresh [4608, 576] float32 weight gradient cost ~1-2 ms a step,
and in a cross-layer transcoder's step the stack of four decoder blocks 37 ms against 19 ms into a buffer already
mapped (:mod:`saeforge.saes.clt_kernels`). A kernel writes its result into a buffer kept from step to step and hands
autograd a fresh alias of it, which autograd adopts as ``.grad`` without a copy (the layout matches the parameter's).

A buffer is reused only when nothing but the cache holds its memory (checked on its storage's reference count): when
the last step's ``.grad`` was set to None (``zero_grad(set_to_none=True)``, as saeforge's trainer does) and its graph
and outputs are gone, it is free; while a ``.grad``, a gradient handed out by ``torch.autograd.grad`` or a graph not
yet back-propagated holds it, a new tensor is allocated and nothing anyone holds is overwritten. CUDA's caching
allocator makes fresh tensors cheap, so there a new tensor is always allocated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["StepBuffers"]


class StepBuffers:
    """Buffers reused from step to step (CPU), one per key: see the module docstring."""

    def __init__(self) -> None:
        self._buffers: dict[Any, Tensor] = {}

    def __deepcopy__(self, memo: dict) -> "StepBuffers":
        return StepBuffers()  # a copy of a module starts with buffers of its own

    def get(self, key: Any, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous tensor of ``shape``, every entry of which the caller overwrites."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._buffers[key] = torch.empty(shape, dtype=dtype)
        elif torch._C._storage_Use_Count(buf.untyped_storage()._cdata) > 2:
            # 2 = the cached tensor and the storage object just made; more: a .grad or a handed-out gradient holds
            # this memory still, which must not be overwritten
            return torch.empty(shape, dtype=dtype)
        return buf.view(shape)  # a fresh alias: autograd adopts it as the .grad without a copy

    def clear(self) -> None:
        self._buffers.clear()
