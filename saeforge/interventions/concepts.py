"""Concept sets with token-level labels, and the concept swap that tests whether a latent controls its concept.

Used by AlignSAE (:mod:`saeforge.saes.alignsae`, arXiv 2512.02004) and to compare it with an unsupervised SAE's
best latent for the same concept (docs/steering.md, "AlignSAE").
"""

from __future__ import annotations

import torch

__all__ = ["auroc"]


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the bool labels ``positive`` (the Mann-Whitney U statistic,
    ties counted half); NaN when one class is empty."""
    scores = scores.detach().double().reshape(-1)
    positive = positive.reshape(-1).bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse = torch.unique(scores, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)
