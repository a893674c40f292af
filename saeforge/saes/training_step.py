"""What passes between the trainer and an SAE at each step: the step's state, the SAE's output, and the counter of
tokens since each latent last fired (which decides which latents are dead)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DeadLatentTracker", "TrainOutput", "TrainState"]


@dataclass
class TrainState:
    """What the trainer tells the SAE about the current step."""

    step: int = 0
    # Steps in the whole run (None = unknown): lets an SAE fit schedules of its own to short runs.
    total_steps: int | None = None
    # Sparsity-coefficient warm-up factor in [0, 1]; multiplies l1 / l0 penalties (TopK-family ignores it).
    sparsity_scale: float = 1.0
    # bool [d_sae]: latents the trainer considers dead (AuxK targets, resampling candidates). None = unknown.
    dead_mask: Tensor | None = None
    # [N, C] per-token labels read from the cache's label site, for an architecture whose config names one
    # (SAEConfig.label_site_for); None otherwise.
    labels: Tensor | None = None


@dataclass
class TrainOutput:
    loss: Tensor
    # Weighted loss contributions by name ("mse", "l1", "auxk", ...); loss == sum(terms.values()).
    terms: dict[str, Tensor]
    x_hat: Tensor
    # bool [d_sae]: latents with a positive activation somewhere in this batch.
    fired: Tensor
    # Mean number of positive latents per token in this batch.
    l0: float


class DeadLatentTracker:
    """Counts, per latent, the tokens seen since it last fired; ``dead`` = not fired for ``threshold`` tokens.

    (A helper for trainers and tests; the counts live in a tensor so a trainer can checkpoint them.)
    """

    def __init__(self, d_sae: int, threshold_tokens: int, device: torch.device | str = "cpu"):
        self.threshold_tokens = int(threshold_tokens)
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)

    def update(self, fired: Tensor, n_tokens: int) -> Tensor:
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired.to(self.tokens_since_fired.device)] = 0
        return self.dead_mask

    @property
    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.threshold_tokens
