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


def harvested_copy(run: Path, folder: Path, seed: int = 3) -> Path:
    """A copy of ``run`` (without checkpoints) in ``folder``/run, harvested on 1,024 tokens of held-out words drawn
    from the test corpus: a feature store of every SAE, for the judge and the dashboard tests."""
    import random
    import shutil

    from saeforge.features.harvest import HarvestConfig, harvest
    from tests.conftest import TEXT

    copy = folder / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    words = TEXT.split()
    rng = random.Random(seed)
    heldout = folder / "heldout.txt"
    heldout.write_text(" ".join(rng.choice(words) for _ in range(2500)))
    harvest(HarvestConfig(path=str(copy), corpus=str(heldout), tokens=64 * 16, batch_size=8, top_examples=5,
                          quantile_bins=4, examples_per_bin=2, random_examples=3, window_before=8, window_after=3,
                          n_logits=5, n_neighbors=4, device="cpu", progress=False))
    return copy
