"""``saeforge demo``: the whole pipeline on the embedded model and corpus, small enough for a laptop CPU."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from simple_parsing.helpers import field

from saeforge.home import saeforge_home
from saeforge.options import DeviceOptions, flat_options


@flat_options
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
    """Steer neutral prompts towards royalty with the feature that writes it (by output effect) and with the
    SAE-refined CAA vector from lines naming royalty, measured by the plain model on the generated text."""
    device_options: DeviceOptions = field(default_factory=DeviceOptions)
    """Where the model runs."""


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


THEME_WORDS = ("king", "queen", "crown", "royal", "majesty", "throne", "prince", "princess", "kingdom")
THEME = r"\b(" + "|".join(THEME_WORDS) + r")\b"
STEER_PROMPTS = 8  # the first neutral prompts of saeforge.interventions.selection: one generation = 12.5 %
STEER_TOKENS = 24
STRENGTH = 0.35  # norm units: both added vectors are this × the mean ‖x‖ at the site (measured: docs/steering.md)
WRITER_CANDIDATES = 8  # features steered for real when choosing the one that writes the theme
PERPLEXITY_FACTOR = 3.0  # the demo's strengths keep the steered perplexity within this factor of the baseline


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


def _show_tokens(promoted: list, n: int = 5) -> str:
    return ", ".join(repr(t) for t, _ in promoted[:n])


def features_step(cfg: DemoConfig, run_dir: Path, lm) -> None:
    import tempfile

    from saeforge.features.contrast import ContrastConfig, contrast
    from saeforge.features.harvest import HarvestConfig, harvest
    from saeforge.features.store import FeatureStore
    from saeforge.interventions.selection import rank_by_output_effect
    from saeforge.interventions.steering import Steerer
    from saeforge.interventions.vectors import caa_vector, collect, refined_caa_vector
    from saeforge.runs import load_run

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

    # what to steer with (cheap: no generation): the best detector of the theme, the feature that writes it, and
    # the SAE-refined CAA vector
    choice = None
    if cfg.steer:
        t = time.time()
        run = load_run(run_dir, lm=lm)
        steerer = Steerer.from_run(run_dir, lm=lm)
        bound = run.saes[cfg.site]
        pos, neg = _theme_texts("embedded:validation")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "pos.txt").write_text("\n".join(pos))
            (Path(tmp) / "neg.txt").write_text("\n".join(neg))
            found = contrast(ContrastConfig(path=str(run_dir), positive=str(Path(tmp) / "pos.txt"),
                                            negative=str(Path(tmp) / "neg.txt"), top=1), run=run)
        detector = found["saes"][cfg.site]["features"][0]
        writers = rank_by_output_effect(lm, bound, THEME_WORDS, top=3, candidates=WRITER_CANDIDATES,
                                        strength=STRENGTH, mean_norm=steerer.mean_norm(cfg.site)[0],
                                        lens=steerer.lens, policy=steerer.policy, include=[detector["feature"]])
        detector.update(writers.checked[detector["feature"]])  # what steering with the detector promotes
        # the best candidate that passes the junk rule (else the best one, said to be junk: a short training)
        junk = not writers.rows
        writer = writers.rows[0] if writers.rows else max(writers.rejected, key=lambda r: r["theme_shift"])
        a = collect(lm, bound.sae, cfg.site, pos, steerer.policy)
        b = collect(lm, bound.sae, cfg.site, neg, steerer.policy)
        caa = caa_vector(a, b)
        refined, relevant = refined_caa_vector(bound.sae, a, b, caa)
        units = bound.sae.W_dec.detach().float().cpu()
        units = units / units.norm(dim=1, keepdim=True)
        main = int(relevant[(units[relevant] @ refined).argmax()])  # the relevant feature closest to the vector
        choice = dict(steerer=steerer, detector=detector, writer=writer, junk=junk, refined=refined,
                      relevant=relevant, main=main, run_dir=run_dir, caa_norm=float(caa.norm()))
        print(f"      chose what to steer with in {time.time() - t:.0f} s (contrast of {len(pos)} lines naming "
              f"royalty vs {len(neg)} others; output effect on {len(writers.words)} theme words)", flush=True)

    if cfg.explain_features > 0 and rows:
        from saeforge.features.autointerp import ExplainConfig, explain
        from saeforge.features.autointerp.backends import LocalHFBackend

        steering = [choice["writer"]["feature"], choice["main"]] if choice else []
        others = [r["idx"] for r in rows[:: max(1, len(rows) // cfg.explain_features)] if r["idx"] not in steering]
        chosen = list(dict.fromkeys(steering + others))[: cfg.explain_features]  # those it steers with first
        t = time.time()
        explain(ExplainConfig(path=str(run_dir), features=tuple(str(i) for i in chosen), device=cfg.device,
                              progress=False), backend=LocalHFBackend(lm=lm, device=cfg.device))
        print(f"[6/7] explained {len(chosen)} features with the embedded model (weak; point `saeforge explain "
              f"--backend openai` at a stronger model) in {time.time() - t:.0f} s:")
        with FeatureStore(store_path, readonly=True) as store:
            for i in chosen:
                f = store.feature(cfg.site, int(i), with_examples=False)
                tokens = ", ".join(repr(tk) for tk, _ in (f["top_tokens"] or [])[:3])
                score = "n/a" if f["score"] is None else f"{f['score']:.2f}"
                role = ("  ← steers below (writes the theme)" if choice and i == choice["writer"]["feature"] else
                        "  ← the main feature of the refined CAA vector" if choice and i == choice["main"] else "")
                said = repr(f["explanation"]) if f["explanation"] else "no explanation (no examples in the harvest)"
                print(f"      #{i} (fires on {tokens or 'nothing in the harvest'}): {said}  detection score "
                      f"{score}{role}")
    else:
        print("[6/7] skipped explanations")

    if choice is None:
        print("[7/7] skipped steering")
        return
    steer_step(cfg, choice)


def steer_step(cfg: DemoConfig, choice: dict) -> None:
    """Steer neutral prompts with the feature that writes the theme and with the SAE-refined CAA vector, at the same
    norm, and measure both by the plain model on the generated text."""
    from saeforge.interventions.generate import pooled_perplexity, steer_points
    from saeforge.interventions.selection import NEUTRAL_PROMPTS
    from saeforge.interventions.steering import FeatureEdit

    t = time.time()
    steerer, detector, writer = choice["steerer"], choice["detector"], choice["writer"]
    feature = writer["feature"]
    norm = steerer.mean_norm(cfg.site)[0]
    refined, caa_norm = choice["refined"], choice["caa_norm"]
    vector = refined / refined.norm() * STRENGTH * norm
    prompts = list(NEUTRAL_PROMPTS[:STEER_PROMPTS])
    runs = steer_points(steerer, prompts, [[FeatureEdit(cfg.site, feature, "add", STRENGTH, "norm")], []],
                        vector_sets=[{}, {cfg.site: vector}], watch=[(cfg.site, feature)],
                        max_new_tokens=STEER_TOKENS, seed=0, theme_words=THEME_WORDS)
    print(f"[7/7] steering towards royalty ({time.time() - t:.0f} s). The best detector of lines naming royalty, "
          f"#{detector['feature']} (AUROC {detector['auroc']:.2f}), promotes {_show_tokens(detector['promoted'])}"
          + (" — word pieces: it detects the theme but does not write it." if detector["junk"] else "."))
    print(f"      Chosen instead by output effect on {', '.join(THEME_WORDS[:4])}, ...: #{feature}, which raises "
          f"log P(theme word next) by {writer['theme_shift']:.1f} nats on neutral prompts and promotes "
          f"{_show_tokens(writer['promoted'])}" + (" (junk too: no candidate passed the junk rule)" if choice["junk"]
                                                   else "") + ".")
    print(f"      Below, #{feature}'s direction and the SAE-refined CAA vector (the CAA direction kept on the "
          f"{len(choice['relevant'])} features that fire more on royal lines) are each added at {STRENGTH:g} × the "
          f"mean ‖x‖ ({norm:.0f}) at {cfg.site} (= {STRENGTH * norm / caa_norm:.1f} × ‖v_CAA‖).")
    base = runs[0]
    for i in range(2):
        print(f"      {prompts[i]!r}\n        baseline:         {base.baseline[i].strip()!r}"
              f"\n        feature #{feature}:  {runs[0].steered[i].strip()!r}"
              f"\n        refined CAA:      {runs[1].steered[i].strip()!r}")
    pb = pooled_perplexity(base.metrics["perplexity_baseline"])
    n = len(prompts)
    print(f"      measured by the plain model on the generated text ({n} neutral prompts × {STEER_TOKENS} tokens; "
          f"theme = a generation naming {', '.join(THEME_WORDS[:3])}, ...):")
    print(f"        {'':<14} {'theme rate':>10} {'perplexity':>11} {f'#{feature} activation':>16}")
    w0 = runs[0].metrics["watched"][0]
    print(f"        {'baseline':<14} {base.metrics['theme_rate_baseline']:>10.0%} {pb:>11.1f} "
          f"{w0['activation_baseline']:>16.2f}")
    for label, r in ((f"feature #{feature}", runs[0]), ("refined CAA", runs[1])):
        ps = pooled_perplexity(r.metrics["perplexity_steered"])
        print(f"        {label:<14} {r.metrics['theme_rate_steered']:>10.0%} {ps:>11.1f} "
              f"{r.metrics['watched'][0]['activation_steered']:>16.2f}   (perplexity × {ps / pb:.1f}"
              + ("" if ps <= PERPLEXITY_FACTOR * pb else f", above the × {PERPLEXITY_FACTOR:g} the demo aims for")
              + ")")
    print(f"      (#{feature} read with the edit still in force: {w0['activation_injected']:.2f}: that measures the "
          f"injection itself, not the text.) Try more: saeforge steer {choice['run_dir']} --feature "
          f"{cfg.site}:{feature} --theme-words {','.join(THEME_WORDS[:4])} --sweep 0.25 0.5 1 --out sweep/")
