"""``saeforge demo``: the whole pipeline on the embedded model and corpus, small enough for a laptop CPU."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from saeforge.home import saeforge_home


@dataclass(frozen=True)
class DemoConfig:
    """Cache activations of the embedded model at a middle layer, train a TopK SAE on them, evaluate it on held-out
    plays (reconstruction, sparsity, CE loss recovered) and print the table."""

    site: str = "layers.15.resid_post"
    """Site to cache and train on (the embedded model has 30 layers; 15 is the middle)."""
    cache_tokens: int = 250_000
    """Activation vectors to cache from the training split."""
    train_tokens: int = 1_000_000
    """Training tokens (the cache is visited several times, reshuffled each epoch)."""
    expansion_factor: int = 8
    """Latents per input dimension (576 × 8 = 4608)."""
    k: int = 32
    """Active latents per token."""
    batch_size: int = 4096
    """Activation vectors per training step."""
    out: str = ""
    """Demo folder; empty: $SAEFORGE_HOME/runs/demo. A rerun reuses its cache and starts a new training run."""
    eval_tokens: int = 4096
    """Held-out token positions (embedded:validation) for the evaluation."""
    device: str = "auto"
    """auto, cpu or cuda."""


def run_demo(cfg: DemoConfig) -> dict:
    from saeforge.data.activation_cache import CacheConfig, build_cache
    from saeforge.evals.evaluate import EvalConfig, evaluate, format_table
    from saeforge.models.language_model import LanguageModel
    from saeforge.training import TrainConfig, train

    root = Path(cfg.out) if cfg.out else saeforge_home() / "runs" / "demo"
    t0 = time.time()
    lm = LanguageModel.load("embedded", device=cfg.device)
    print(f"[1/4] loaded the embedded model ({lm.model_type}, {lm.n_layers} layers, d_model {lm.d_model}) "
          f"in {time.time() - t0:.1f} s", flush=True)

    t1 = time.time()
    cache = build_cache(CacheConfig(out=str(root / "activations"), model="embedded", sites=(cfg.site,),
                                    tokens=cfg.cache_tokens, corpus="embedded:train", device=cfg.device), lm=lm)
    m = cache.manifest
    print(f"[2/4] cached {m['token_count']:,} tokens of {cfg.site} into {cache.folder} "
          f"({len(m['shards'])} shards, mean norm {m['mean_norm'][cfg.site]:.1f}, {time.time() - t1:.0f} s)",
          flush=True)

    run_dir = root / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t2 = time.time()
    final = train(TrainConfig(out=str(run_dir), cache=str(cache.folder), sites=(cfg.site,), tokens=cfg.train_tokens,
                              batch_size=cfg.batch_size, architecture="topk",
                              expansion_factor=cfg.expansion_factor, k=cfg.k, device=cfg.device,
                              log_every=10, checkpoint_every=100))
    metrics = final[cfg.site]
    dt = time.time() - t2
    print(f"[3/4] trained a TopK SAE (d_sae {cfg.expansion_factor * lm.d_model}, k {cfg.k}) on "
          f"{cfg.train_tokens:,} tokens in {dt:.0f} s ({cfg.train_tokens / dt:,.0f} tokens/s)")
    print(f"      final training batch: FVU {metrics['fvu']:.3f} (explained variance {1 - metrics['fvu']:.1%}), "
          f"L0 {metrics['l0']:.1f}, dead latents {metrics['dead_fraction']:.1%}")
    print(f"      SAE saved to {run_dir / 'saes' / cfg.site} (SAELens-compatible); metrics in "
          f"{run_dir / 'metrics.jsonl'}", flush=True)

    t3 = time.time()
    report = evaluate(EvalConfig(path=str(run_dir), corpus="embedded:validation", tokens=cfg.eval_tokens,
                                 device=cfg.device))
    print(f"[4/4] evaluated on {report['n_token_positions']:,} held-out token positions (Hamlet, Macbeth, ...) "
          f"in {time.time() - t3:.0f} s:")
    print("      " + format_table(report).replace("\n", "\n      "))
    print(f"      eval.json and plots in {run_dir}")
    return report["saes"][cfg.site]
