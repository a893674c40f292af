"""``saeforge demo``: the whole pipeline on the embedded model and corpus, small enough for a laptop CPU."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from saeforge.home import saeforge_home


@dataclass(frozen=True)
class DemoConfig:
    """The whole pipeline on the embedded model: cache activations at a middle layer, train a TopK SAE, evaluate it on
    held-out plays, harvest its features, explain a few with the local model, find the features of a theme by
    contrast and steer generations with one, then print the command that opens the dashboard."""

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
    harvest_tokens: int = 16_384
    """Held-out token positions streamed into the feature store."""
    explain_features: int = 3
    """Features explained with the local model (0 skips; SmolLM2-135M is a weak explainer)."""
    steer: bool = True
    """Find a theme feature by contrast (lines about kings and queens versus others) and steer with it."""
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
    print(f"[1/7] loaded the embedded model ({lm.model_type}, {lm.n_layers} layers, d_model {lm.d_model}) "
          f"in {time.time() - t0:.1f} s", flush=True)

    t1 = time.time()
    cache = build_cache(CacheConfig(out=str(root / "activations"), model="embedded", sites=(cfg.site,),
                                    tokens=cfg.cache_tokens, corpus="embedded:train", device=cfg.device), lm=lm)
    m = cache.manifest
    print(f"[2/7] cached {m['token_count']:,} tokens of {cfg.site} into {cache.folder} "
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
    print(f"[3/7] trained a TopK SAE (d_sae {cfg.expansion_factor * lm.d_model}, k {cfg.k}) on "
          f"{cfg.train_tokens:,} tokens in {dt:.0f} s ({cfg.train_tokens / dt:,.0f} tokens/s)")
    print(f"      final training batch: FVU {metrics['fvu']:.3f} (explained variance {1 - metrics['fvu']:.1%}), "
          f"L0 {metrics['l0']:.1f}, dead latents {metrics['dead_fraction']:.1%}")
    print(f"      SAE saved to {run_dir / 'saes' / cfg.site} (SAELens-compatible); metrics in "
          f"{run_dir / 'metrics.jsonl'}", flush=True)

    t3 = time.time()
    report = evaluate(EvalConfig(path=str(run_dir), corpus="embedded:validation", tokens=cfg.eval_tokens,
                                 device=cfg.device))
    print(f"[4/7] evaluated on {report['n_token_positions']:,} held-out token positions (Hamlet, Macbeth, ...) "
          f"in {time.time() - t3:.0f} s:")
    print("      " + format_table(report).replace("\n", "\n      "))
    print(f"      eval.json and plots in {run_dir}", flush=True)
    features_step(cfg, run_dir, lm)
    print(f"\nopen the dashboard:  saeforge serve {run_dir}")
    return report["saes"][cfg.site]


THEME = r"\b(king|queen|crown|royal|majesty|throne|prince|princess|kingdom)\b"


def _theme_texts(lines_from: str, n: int = 48) -> tuple[list[str], list[str]]:
    """Lines of held-out plays that name royalty, and an equal number that do not (deterministic)."""
    import random
    import re

    from saeforge.data.text_source import TextSource

    lines = [ln.strip() for doc in TextSource(lines_from).documents() for ln in doc.splitlines()
             if len(ln.strip()) > 30]
    pattern = re.compile(THEME, re.IGNORECASE)
    pos = [ln for ln in lines if pattern.search(ln)]
    neg = [ln for ln in lines if not pattern.search(ln)]
    rng = random.Random(0)
    rng.shuffle(pos)
    rng.shuffle(neg)
    return pos[:n], neg[:n]


def features_step(cfg: DemoConfig, run_dir: Path, lm) -> None:
    from saeforge.features.contrast import ContrastConfig, contrast
    from saeforge.features.harvest import HarvestConfig, harvest
    from saeforge.features.inspect import Inspector
    from saeforge.features.store import FeatureStore
    from saeforge.interventions.generate import run_steering
    from saeforge.interventions.steering import FeatureEdit, Steerer

    t = time.time()
    store_path = harvest(HarvestConfig(path=str(run_dir), corpus="embedded:validation", tokens=cfg.harvest_tokens,
                                       device=cfg.device))
    with FeatureStore(store_path, readonly=True) as store:
        rate = store.meta("stream_tokens_per_s")
        # features that fire on 0.2–5 % of tokens: specific enough to have a story, common enough to have examples
        rows = [r for r in store.list_features(cfg.site, order="density", limit=cfg.expansion_factor * 576)
                if 0.002 <= r["density"] <= 0.05]
    print(f"[5/7] harvested {cfg.harvest_tokens:,} held-out tokens ({rate:,.0f} tokens/s) into {store_path} "
          f"in {time.time() - t:.0f} s", flush=True)

    if cfg.explain_features > 0 and rows:
        from saeforge.features.autointerp import ExplainConfig, explain

        chosen = [str(r["idx"]) for r in rows[:: max(1, len(rows) // cfg.explain_features)][: cfg.explain_features]]
        t = time.time()
        explain(ExplainConfig(path=str(run_dir), features=tuple(chosen), device=cfg.device, progress=False))
        print(f"[6/7] explained {len(chosen)} features with the embedded model (weak; point `saeforge explain "
              f"--backend openai` at a stronger model) in {time.time() - t:.0f} s:")
        with FeatureStore(store_path, readonly=True) as store:
            for i in chosen:
                f = store.feature(cfg.site, int(i), with_examples=False)
                tokens = ", ".join(repr(tk) for tk, _ in (f["top_tokens"] or [])[:3])
                score = "n/a" if f["score"] is None else f"{f['score']:.2f}"
                print(f"      #{i} (fires on {tokens}): {f['explanation']!r}  detection score {score}")
    else:
        print("[6/7] skipped explanations")

    if not cfg.steer:
        print("[7/7] skipped steering")
        return
    import tempfile

    pos, neg = _theme_texts("embedded:validation")
    inspector = Inspector(run_dir, lm=lm)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "pos.txt").write_text("\n".join(pos))
        (Path(tmp) / "neg.txt").write_text("\n".join(neg))
        found = contrast(ContrastConfig(path=str(run_dir), positive=str(Path(tmp) / "pos.txt"),
                                        negative=str(Path(tmp) / "neg.txt"), top=3), inspector=inspector)
    best = found["saes"][cfg.site]["features"][0]
    steerer = Steerer.from_run(run_dir, lm=lm)
    prompts = ["The weather today is", "My favourite thing to do is"]
    run = run_steering(steerer, prompts, [FeatureEdit(cfg.site, best["feature"], "add", 2.0)], max_new_tokens=24,
                       seed=0)
    e = run.metrics["edits"][0]
    print(f"[7/7] contrast of {len(pos)} lines naming royalty vs {len(neg)} others: feature #{best['feature']} "
          f"(AUROC {best['auroc']:.2f}, fires on {best['freq_pos']:.0%} vs {best['freq_neg']:.0%} of lines); "
          f"steering with it (add 2 × its max activation):")
    for p, b, st in zip(run.prompts, run.baseline, run.steered):
        print(f"      {p!r}\n        baseline: {b.strip()!r}\n        steered:  {st.strip()!r}")
    pb, ps = run.metrics["perplexity_baseline"], run.metrics["perplexity_steered"]
    print(f"      target activation on generated tokens {e['target_activation_baseline']:.2f} → "
          f"{e['target_activation_steered']:.2f}; perplexity under the plain model {sum(pb) / len(pb):.1f} → "
          f"{sum(ps) / len(ps):.1f}; KL on the prompt {run.metrics['kl_prompt']:.3f}")
