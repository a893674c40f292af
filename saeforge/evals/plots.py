"""PNG plots of an evaluation (matplotlib, from the ``plots`` extra; skipped with a note when it is missing)."""

from __future__ import annotations

from pathlib import Path

import torch


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

    fig, ax = plt.subplots(figsize=(6, 3.5))
    dead = int((density == 0).sum())
    ax.hist(torch.log10(density[density > 0]).numpy(), bins=50, color="#4c72b0")
    ax.set(xlabel="log10 feature density (fraction of tokens a latent fires on)", ylabel="latents",
           title=f"{name}: feature density ({dead} dead of {density.numel()})")
    save(fig, "feature_density.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(l0.numpy(), bins=min(60, max(10, int(l0.max()) + 1)), color="#55a868")
    ax.set(xlabel="active latents per token (L0)", ylabel="tokens", title=f"{name}: L0 per token "
           f"(mean {l0.float().mean():.1f})")
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
