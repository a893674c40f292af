"""Shared pieces of the format tests: small saeforge SAEs with non-trivial parameters, random inputs, and the
foreign tools' documented encode formulas (written from their documentation, never imported from the tools)."""

from __future__ import annotations

import torch

# the same small SAEs as the architecture tests (random weights, non-zero biases and thresholds)
from tests.saes.helpers import D_IN, D_SAE, VARIANTS, build  # noqa: F401


def inputs(n: int = 64, d: int = D_IN, seed: int = 1, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def topk_dense(pre: torch.Tensor, k: int) -> torch.Tensor:
    """ReLU then keep each row's k largest (sparsify / dictionary_learning / OpenAI TopK)."""
    post = torch.relu(pre)
    vals, idx = post.topk(k, dim=-1)
    return torch.zeros_like(post).scatter_(-1, idx, vals)


def assert_same_encodings(a, b, x=None) -> None:
    x = inputs() if x is None else x
    ea, eb = a.encode(x), b.encode(x)
    assert (ea > 0).any(), "test inputs activate nothing; the comparison would be vacuous"
    assert torch.equal(ea, eb), f"max |diff| {(ea - eb).abs().max().item()}"
