"""Reconstruction and sparsity metrics, accumulated over batches in float64 so the pooled numbers are exact.

Definitions (as in SAEBench, arXiv 2503.09532), computed directly rather than through the algebraic shortcuts
some peers ship:
- FVU = Σ‖x − x̂‖² / Σ‖x − mean(x)‖², pooled over all evaluated tokens; explained variance = 1 − FVU.
  The denominator uses the dataset mean, accumulated as Σ‖x‖² − N‖mean‖² from float64 sums.
- MSE = mean over tokens and dimensions of (x − x̂)²; ``mse_per_token`` sums over dimensions instead.
- cosine = mean over tokens of cos(x, x̂); ``relative_norm`` = mean over tokens of ‖x̂‖/‖x‖;
  ``relative_reconstruction_bias`` γ = E‖x̂‖² / E[x·x̂] (γ < 1 means shrinkage; Rajamanoharan et al.).
- L0 = mean over tokens of the number of nonzero latents; dead = fired on no evaluated token; dense = fraction of
  latents firing on more than 1 % / 10 % of tokens.
"""

from __future__ import annotations

import math

import torch

L0_BINS = 64


class ReconstructionStats:
    def __init__(self, d_in: int, d_sae: int, device: torch.device | str = "cpu"):
        f64 = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.sum_x = torch.zeros(d_in, **f64)
        self.sum_sq_x = torch.zeros((), **f64)
        self.sum_sq_err = torch.zeros((), **f64)
        self.sum_cos = torch.zeros((), **f64)
        self.sum_rel_norm = torch.zeros((), **f64)
        self.sum_sq_xhat = torch.zeros((), **f64)
        self.sum_dot = torch.zeros((), **f64)
        self.sum_l1 = torch.zeros((), **f64)
        self.fire_counts = torch.zeros(d_sae, **f64)
        self.act_sums = torch.zeros(d_sae, **f64)
        self.l0_values: list[torch.Tensor] = []
        self.nonzero_sample: list[torch.Tensor] = []
        self.d_in = d_in

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        x, x_hat, f = x.double(), x_hat.double(), f.double()
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_sq_x += x.pow(2).sum()
        self.sum_sq_err += (x - x_hat).pow(2).sum()
        nx, nh = x.norm(dim=-1), x_hat.norm(dim=-1)
        self.sum_cos += ((x * x_hat).sum(-1) / (nx * nh).clamp_min(1e-12)).sum()
        self.sum_rel_norm += (nh / nx.clamp_min(1e-12)).sum()
        self.sum_sq_xhat += nh.pow(2).sum()
        self.sum_dot += (x * x_hat).sum()
        active = f != 0
        self.sum_l1 += f.abs().sum()
        self.fire_counts += active.sum(0)
        self.act_sums += f.sum(0)
        self.l0_values.append(active.sum(-1).cpu())
        nz = f[active]
        if nz.numel():
            keep = min(nz.numel(), 20_000)  # a bounded sample for the magnitude histogram
            self.nonzero_sample.append(nz[torch.randperm(nz.numel(), device=nz.device)[:keep]].float().cpu())

    def result(self) -> dict:
        n = max(self.n, 1)
        mean = self.sum_x / n
        total_var = float(self.sum_sq_x - n * mean.pow(2).sum())
        fvu = float(self.sum_sq_err) / total_var if total_var > 0 else math.nan
        density = (self.fire_counts / n).cpu()
        l0 = torch.cat(self.l0_values).double() if self.l0_values else torch.zeros(1, dtype=torch.float64)
        hist_edges = torch.linspace(-8, 0, 33, dtype=torch.float64)
        log_density = torch.log10(density.clamp_min(1e-9))
        return {
            "n_tokens": self.n,
            "mse": float(self.sum_sq_err) / (n * self.d_in),
            "mse_per_token": float(self.sum_sq_err) / n,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "cosine_similarity": float(self.sum_cos) / n,
            "relative_norm": float(self.sum_rel_norm) / n,
            "relative_reconstruction_bias": float(self.sum_sq_xhat / self.sum_dot) if float(self.sum_dot) else math.nan,
            "l0": float(l0.mean()),
            "l0_quantiles": {str(q): float(torch.quantile(l0, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
            "l1": float(self.sum_l1) / n,
            "dead_fraction": float((self.fire_counts == 0).double().mean()),
            "dense_fraction_1pct": float((density > 0.01).double().mean()),
            "dense_fraction_10pct": float((density > 0.10).double().mean()),
            "feature_density_histogram": {
                "log10_density_edges": hist_edges.tolist(),
                "counts": torch.histc(log_density.clamp(-8, 0), bins=32, min=-8, max=0).long().tolist(),
                "dead": int((self.fire_counts == 0).sum()),
            },
        }

    def feature_density(self) -> torch.Tensor:
        return (self.fire_counts / max(self.n, 1)).float().cpu()

    def l0_per_token(self) -> torch.Tensor:
        return torch.cat(self.l0_values) if self.l0_values else torch.zeros(0)

    def nonzero_activations(self) -> torch.Tensor:
        return torch.cat(self.nonzero_sample) if self.nonzero_sample else torch.zeros(0)
