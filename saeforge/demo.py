"""``saeforge demo``: the whole pipeline on the embedded model and corpus, small enough for a laptop CPU."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from saeforge.home import saeforge_home


@dataclass(frozen=True)
class DemoConfig:
    """Load the embedded model, cache activations at a middle layer and summarise them."""

    site: str = "layers.15.resid_post"
    """Site to cache (the embedded model has 30 layers; 15 is the middle)."""
    tokens: int = 50_000
    """Tokens to cache."""
    out: str = ""
    """Run folder; empty: $SAEFORGE_HOME/runs/demo."""
    device: str = "auto"
    """auto, cpu or cuda."""


def run_demo(cfg: DemoConfig) -> None:
    import torch

    from saeforge.data.activation_cache import CacheConfig, build_cache
    from saeforge.models.language_model import LanguageModel

    run_dir = Path(cfg.out) if cfg.out else saeforge_home() / "runs" / "demo"
    t0 = time.time()
    lm = LanguageModel.load("embedded", device=cfg.device)
    print(f"[1/2] loaded the embedded model ({lm.model_type}, {lm.n_layers} layers, d_model {lm.d_model}) "
          f"in {time.time() - t0:.1f} s")
    cache_cfg = CacheConfig(out=str(run_dir / "activations"), model="embedded", sites=(cfg.site,),
                            tokens=cfg.tokens, corpus="embedded:train", device=cfg.device)
    t1 = time.time()
    cache = build_cache(cache_cfg, lm=lm)
    dt = time.time() - t1
    m = cache.manifest
    acts = cache.load(cfg.site, max_tokens=20_000).float()
    norms = acts.norm(dim=-1)
    print(f"[2/2] cached {m['token_count']:,} tokens of {cfg.site} into {cache.folder} "
          f"({len(m['shards'])} shards, {dt:.0f} s)")
    print(f"      d={acts.shape[1]}  mean norm {m['mean_norm'][cfg.site]:.2f}  "
          f"norm 5/50/95 %: {torch.quantile(norms, torch.tensor([0.05, 0.5, 0.95])).tolist()}")
    print(f"      mean |activation| {acts.abs().mean():.4f}; largest-variance dimension "
          f"{int(acts.var(0).argmax())} (variance {float(acts.var(0).max()):.2f})")
    print("next: `saeforge cache --help` to cache other sites; training comes with `saeforge train`.")
