"""Small SAEs saved to folders, for the hierarchy tests."""

from __future__ import annotations

from pathlib import Path

import torch

from saeforge.saes import HSAEConfig, JumpReLUConfig, MatryoshkaConfig, make_sae, save_sae

D_IN = 8


def random_jumprelu(width: int, seed: int, d_in: int = D_IN):
    torch.manual_seed(seed)
    sae = make_sae(JumpReLUConfig(d_in=d_in, d_sae=width, threshold_init=0.3))
    with torch.no_grad():
        sae.b_enc.copy_(0.2 * torch.randn(width))
    return sae


def saved(sae, folder: Path, site: str = "layers.1.resid_post", **meta) -> Path:
    return save_sae(sae, folder, metadata={"hook_name": site, "model_name": "m", **meta})


def random_hsae(levels=(6, 20), seed: int = 0, d_in: int = D_IN):
    torch.manual_seed(seed)
    sae = make_sae(HSAEConfig(d_in=d_in, d_sae=sum(levels), level_sizes=levels, threshold_init=0.3))
    with torch.no_grad():
        sae.b_enc.copy_(0.2 * torch.randn(sae.cfg.d_sae))
    sae.update_tree()
    return sae


def random_matryoshka(groups=(4, 12, 16), seed: int = 0, d_in: int = D_IN):
    torch.manual_seed(seed)
    sae = make_sae(MatryoshkaConfig(d_in=d_in, d_sae=sum(groups), k=3, group_sizes=groups))
    sae.threshold.fill_(0.2)
    return sae


def activations(n: int = 2000, d_in: int = D_IN, seed: int = 1) -> torch.Tensor:
    return 2 * torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))
