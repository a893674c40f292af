"""A random TopK SAE on a tiny model's ``layers.2.mlp_hidden``, saved as an SAE folder, and short retain text."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import TEXT

SITE = "layers.2.mlp_hidden"
PROMPT = "To be, or not to be,"
TARGET = " sea"


def tiny_sae(d_in: int = 64, d_sae: int = 128, k: int = 8, seed: int = 0):
    from saeforge.saes import TopKConfig, make_sae

    torch.manual_seed(seed)
    return make_sae(TopKConfig(d_in=d_in, d_sae=d_sae, k=k))


def save_tiny_sae(folder: Path, model_dir: Path, site: str = SITE, d_in: int = 64) -> Path:
    from saeforge.saes import save_sae

    return save_sae(tiny_sae(d_in), folder, metadata={"hook_name": site, "model_name": str(model_dir),
                                                       "context_size": 64})


def retain_ids(lm, n: int = 4, length: int = 24) -> torch.Tensor:
    ids = lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    rows = [[0] + ids[i * 7:i * 7 + length - 1] for i in range(n)]
    return torch.tensor(rows, dtype=torch.long)


def params(lm) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in lm.model.named_parameters()}
