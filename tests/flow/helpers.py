"""Synthetic decoders with planted matches, and suites built from them (no training needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from saeforge.saes import TopKConfig, make_sae, save_sae


def unit(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, d, generator=gen)
    return w / w.norm(dim=1, keepdim=True)


def noisy(w: torch.Tensor, noise: float, gen: torch.Generator) -> torch.Tensor:
    """Rows of ``w`` moved by relative ``noise`` (cosine to the original ≈ 1/sqrt(1 + noise²))."""
    out = w + noise * torch.randn(w.shape, generator=gen) / w.shape[1] ** 0.5
    return out / out.norm(dim=1, keepdim=True)


def topk_sae(w_dec: torch.Tensor, k: int = 4, seed: int = 0):
    """A TopK SAE with decoder ``w_dec`` and the tied encoder (activations ≈ projections on the directions)."""
    torch.manual_seed(seed)
    sae = make_sae(TopKConfig(d_in=w_dec.shape[1], d_sae=w_dec.shape[0], k=k))
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def write_suite(root: Path, decoders: dict[str, torch.Tensor], meta: dict | None = None, k: int = 4) -> Path:
    """A run-directory suite: root/saes/<site>/ for each site's decoder."""
    for site, w in decoders.items():
        save_sae(topk_sae(w, k), root / "saes" / site, metadata={"hook_name": site, **(meta or {})})
    return root
