"""The NaN/Inf check on activations, in one reduction.

``torch.isfinite(x).all()`` writes a boolean tensor the size of ``x`` and reduces it; on the training path it runs on
every forward batch and every training batch (a [4096, 768] bfloat16 batch: 3.8 ms on 2 CPU cores, 0.3 s of a
131,072-token run). :func:`all_finite` takes the smallest and largest value in one pass instead (0.14 ms there): a NaN
makes both NaN (the reduction propagates it), +Inf is the largest value and -Inf the smallest, so the two are
finite exactly when every element is.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["all_finite"]


def all_finite(x: Tensor) -> bool:
    """Whether every element of the floating-point tensor ``x`` is finite (no NaN, +Inf or -Inf); True when empty."""
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))
