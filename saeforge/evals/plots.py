"""PNG plots of an evaluation (matplotlib, from the ``plots`` extra; skipped with a note when it is missing)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

MAX_L0_BINS = 60


def count_share(n: int, total: int) -> str:
    """``12 (0.29 %)``: a count and its share of ``total``, the one way saeforge shows counts such as dead latents
    (the overview's metrics and the plots agree)."""
    if not total:
        return f"{n:,}"
    p = 100 * n / total
    return f"{n:,} ({p:.1f} %)" if p >= 1 or p == 0 else f"{n:,} ({p:.2g} %)"


def l0_bins(l0: np.ndarray) -> np.ndarray:
    """Histogram edges for active-latent counts: one bar per integer, centred on it, over the observed range and a
    couple of integers either side (a TopK SAE's L0 is one value, which must still read as a bar at k, not as a
    bar filling a meaningless axis); ranges wider than ``MAX_L0_BINS`` get integer-wide groups of several counts."""
    l0 = np.asarray(l0)
    if l0.size == 0:
        return np.arange(-0.5, 2.0)
    lo, hi = int(np.floor(l0.min())), int(np.ceil(l0.max()))
    step = max(1, -(-(hi - lo + 1) // MAX_L0_BINS))
    margin = 2 * step
    start = max(0, lo - margin)
    return np.arange(start, hi + margin + step + 1, step) - 0.5


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def eval_plots(folder: Path, name: str, density: torch.Tensor, l0: torch.Tensor, nonzero: torch.Tensor) -> list[Path]:
    """Feature density (log scale), L0 per token, nonzero activation magnitudes. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saeforge.utils.atomic import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, filename):
        path = folder / filename
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
        plt.close(fig)
        written.append(path)

    import torch
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.5))
    dead = int((density == 0).sum())
    ax.hist(torch.log10(density[density > 0]).numpy(), bins=50, color="#4c72b0")
    ax.set(xlabel="log10 feature density (fraction of tokens a latent fires on)", ylabel="latents",
           title=f"{name}: feature density\n(dead latents: {count_share(dead, density.numel())} of "
                 f"{density.numel():,})")
    save(fig, "feature_density.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    counts = l0.float().numpy()
    ax.hist(counts, bins=l0_bins(counts), color="#55a868", edgecolor="white", linewidth=0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    same = f"; every token {int(counts[0])}" if counts.size and counts.min() == counts.max() else ""
    ax.set(xlabel="active latents per token (L0)", ylabel="tokens", title=f"{name}: L0 per token "
           f"(mean {counts.mean() if counts.size else 0:.1f}{same})")
    save(fig, "l0_per_token.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(nonzero.numpy(), bins=80, color="#c44e52", log=True)
    ax.set(xlabel="activation value (nonzero only)", ylabel="count (log)", title=f"{name}: nonzero activations")
    save(fig, "activation_magnitudes.png")
    return written


def activation_heatmap(path: Path, name: str, acts: torch.Tensor, features: list[int], labels: list[str]) -> Path:
    """Heat map of per-sample maximum activations [samples, features] (rows: samples, columns: features)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saeforge.utils.atomic import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.22 * len(features)), min(10, 1.5 + 0.16 * len(labels))))
    from matplotlib.colors import PowerNorm

    # square-root colour scale: a few outlier features would otherwise flatten everything else to one colour
    im = ax.imshow(acts.numpy(), aspect="auto", cmap="viridis", interpolation="nearest",
                   norm=PowerNorm(0.5, vmin=0, vmax=max(float(acts.max()), 1e-6)))
    ax.set_xticks(range(len(features)), [str(f) for f in features], rotation=90, fontsize=6)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set(xlabel="feature", ylabel="sample (start of the context)",
           title=f"{name}: max activation per sample, most frequent features")
    fig.colorbar(im, ax=ax, fraction=0.03)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path
