"""``saeforge snmf fit``: SNMF of a model's MLP neurons from an activation cache or live text, saved with its feature
store. ``saeforge snmf inspect``: what a fit holds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.neurons.snmf import META_FILE, SNMF, CacheChunks, SNMFSettings, fit_hierarchy, fit_snmf

FIT_LOCK = "saeforge snmf fit"


@torch.inference_mode()
def collect_activations(lm, site: str, *, corpus: str = "embedded:train", tokens: int = 32_768,
                        context_length: int = 128, batch_size: int = 16, text_field: str = "text",
                        progress: bool = True) -> torch.Tensor:
    """``[n, d_mlp]`` float32 MLP hidden activations of up to ``tokens`` kept positions (BOS, EOS and padding left
    out: their norms are outliers) of ``corpus``."""
    from tqdm.auto import tqdm

    from saeforge.data.text_source import TextSource
    from saeforge.data.token_stream import TokenPolicy, TokenStream
    from saeforge.neurons.mlp import mlp_site

    s = mlp_site(lm, site)
    stream = TokenStream.for_model(TextSource(corpus, text_field), lm, TokenPolicy(context_length))
    parts, n = [], 0
    bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc="activations", disable=not progress, leave=False)
    for _, ids in stream.batches(batch_size):
        keep = stream.keep_mask(ids)
        x = lm.read(ids, [s])[s.name][keep.to(lm.device)].float().cpu()
        parts.append(x[: tokens - n])
        n += parts[-1].shape[0]
        bar.update(parts[-1].shape[0])
        if n >= tokens:
            break
    bar.close()
    if n == 0:
        raise SaeforgeError(f"the corpus {corpus!r} gave no tokens", "use a larger corpus")
    return torch.cat(parts)


@dataclass(frozen=True)
class SNMFFitConfig:
    """Decompose a model's MLP neurons into SNMF features (semi-NMF with winner-take-all neuron groups, arXiv
    2506.10920), from an activation cache or live text; save the fit and fill its feature store for the dashboard."""

    out: str = field(default="", positional=True)
    """Folder for the fit (snmf.safetensors, snmf.json, features.sqlite); a killed fit resumes there."""
    site: str = "layers.15.mlp_hidden"
    """The MLP hidden site to decompose: layers.N.mlp_hidden (the input of the MLP's down projection)."""
    cache: str = ""
    """An activation cache holding the site (saeforge cache --sites layers.N.mlp_hidden), streamed shard by shard;
    empty: run the model over --corpus."""
    model: str = "embedded"
    """Model (ignored with --cache, which names its own): embedded, a hub id, a local folder or a .gguf file."""
    corpus: str = "embedded:train"
    """Text the activations are read on, without --cache (the paper fits on a concept corpus)."""
    tokens: int = 32_768
    """Token positions to fit on (from the cache or the corpus)."""
    context_length: int = 128
    """Tokens per context, BOS included (live text)."""
    batch_size: int = 16
    """Contexts per forward pass."""
    rank: int = 50
    """Number of features k (the paper: 100 per layer for Llama-3.1-8B, 50 for GPT-2); at most the number of
    neurons."""
    sparsity: float = 0.01
    """Winner-take-all keep-fraction: neurons per feature = ⌈sparsity × d_mlp⌉ (the paper's 1 percent)."""
    max_iter: int = 1000
    """Iteration limit."""
    patience: int = 100
    """Stop after this many iterations without a relative improvement above --tol."""
    tol: float = 1e-4
    """Improvement of the relative loss ‖X − GZ‖²/‖X‖² that counts as progress."""
    seed: int = 0
    """Seed of the random initial coefficients."""
    coarse_rank: int = 0
    """Hierarchical variant: also factorise the features into this many coarse ones (0: no hierarchy)."""
    finetune_steps: int = 0
    """Hierarchical variant: Adam steps tuning both levels jointly on the data (the paper tunes 500). Tuned, every
    fine feature becomes a mix of the coarse ones, so the fine features span only --coarse-rank dimensions and a
    token's fine coefficients are no longer unique; 0 keeps the fine features as fitted."""
    checkpoint_every: int = 50
    """Save the fit's state every this many iterations (a killed fit resumes from it)."""
    store: bool = True
    """Fill features.sqlite (input-side examples on held-out text, output-side vocabulary projections)."""
    store_corpus: str = "embedded:validation"
    """Held-out text for the feature store's examples."""
    store_tokens: int = 16_384
    """Token positions streamed into the feature store."""
    fire_threshold: float = 0.1
    """A token counts as firing for a feature where its activation is at least this fraction of the feature's
    largest (SNMF coefficients are rarely exactly 0); only the densities depend on it."""
    device: str = "auto"
    """auto, cpu or cuda."""
    progress: bool = True
    """Show progress bars."""

    def settings(self) -> SNMFSettings:
        return SNMFSettings(self.rank, self.sparsity, self.max_iter, self.patience, self.tol, self.seed)


def check_fit_config(cfg: SNMFFitConfig) -> None:
    """Bad input before any model loads: no output, a site that is not an MLP hidden site, a model family without
    one, a rank above the number of neurons, settings out of range."""
    from saeforge.neurons.mlp import check_mlp_model, mlp_layer
    from saeforge.neurons.snmf import check_settings

    if not cfg.out:
        raise SaeforgeError("no output folder", "saeforge snmf fit OUT_DIR --site layers.15.mlp_hidden")
    mlp_layer(cfg.site)
    check_settings(cfg.settings())
    for name in ("tokens", "batch_size", "checkpoint_every", "context_length"):
        if getattr(cfg, name) < 1:
            raise SaeforgeError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be at least 1",
                                f"pass --{name.replace('_', '-')} {getattr(SNMFFitConfig(), name)}")
    if cfg.coarse_rank and cfg.coarse_rank >= cfg.rank:
        raise SaeforgeError(f"--coarse-rank {cfg.coarse_rank} is not below --rank {cfg.rank}",
                            f"pass --coarse-rank {max(1, cfg.rank // 4)} (or 0: no hierarchy)")
    if (Path(cfg.out) / META_FILE).is_file():
        raise SaeforgeError(f"{cfg.out} already holds an SNMF fit", "choose another folder, or delete it to refit")
    if cfg.cache:
        from saeforge.data.activation_cache import ActivationCache
        from saeforge.neurons.snmf import check_rank

        cache = ActivationCache(cfg.cache)
        if cfg.site not in cache.sites:
            raise SaeforgeError(f"the cache {cfg.cache} does not hold {cfg.site} (it holds {', '.join(cache.sites)})",
                                f"cache the site first: saeforge cache --sites {cfg.site} --out DIR")
        check_rank(cfg.rank, cache.d(cfg.site))
        if cache.source == "model":
            check_mlp_model(cache.manifest["model"], cfg.site, cfg.rank)
    else:
        check_mlp_model(cfg.model, cfg.site, cfg.rank)


def fit_command(cfg: SNMFFitConfig, lm=None) -> SNMF:
    """Fit, save and (with ``store``) fill the feature store; returns the fit."""
    from saeforge.utils.locking import exclusive_lock

    check_fit_config(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out, FIT_LOCK):
        return _fit_locked(cfg, out, lm)


def _fit_locked(cfg: SNMFFitConfig, out: Path, lm) -> SNMF:
    from saeforge.models.language_model import LanguageModel
    from saeforge.neurons.snmf import remove_checkpoint

    info = {"site": cfg.site}
    if cfg.cache:
        chunks = CacheChunks(cfg.cache, cfg.site, cfg.tokens)
        m = chunks.cache.manifest
        data = chunks
        model_name = m.get("model", "")
        info.update(model=model_name, model_fingerprint=m.get("model_fingerprint"), source=f"cache {cfg.cache}",
                    corpus=m.get("corpus"))
        if cfg.store and model_name and lm is None:
            lm = LanguageModel.load(model_name, device=cfg.device)
        if lm is not None and m.get("model_fingerprint") and lm.fingerprint() != m["model_fingerprint"]:
            raise SaeforgeError(f"the cache {cfg.cache} was written by another model than {lm.name}",
                                "pass the model the cache was made with")
    else:
        lm = lm or LanguageModel.load(cfg.model, device=cfg.device)
        data = collect_activations(lm, cfg.site, corpus=cfg.corpus, tokens=cfg.tokens,
                                   context_length=cfg.context_length, batch_size=cfg.batch_size,
                                   progress=cfg.progress)
        info.update(model=cfg.model, model_fingerprint=lm.fingerprint(), source="live text", corpus=cfg.corpus)
    fit = fit_snmf(data, cfg.settings(), checkpoint=out, checkpoint_every=cfg.checkpoint_every,
                   progress=cfg.progress, info=info)
    if cfg.coarse_rank:
        fit = fit_hierarchy(fit, cfg.coarse_rank, data, finetune_steps=cfg.finetune_steps, progress=cfg.progress)
    fit.save(out)
    remove_checkpoint(out)
    loss_plot(fit, out / "plots" / "snmf_loss.png")
    if cfg.store:
        from saeforge.neurons.store import write_feature_store

        write_feature_store(out, fit, lm, site=cfg.site, corpus=cfg.store_corpus, tokens=cfg.store_tokens,
                            context_length=cfg.context_length, batch_size=cfg.batch_size,
                            fire_threshold=cfg.fire_threshold, seed=cfg.seed, progress=cfg.progress,
                            lock=False)  # this command holds the folder's lock
    return fit


def loss_plot(fit: SNMF, path: Path) -> Path | None:
    """The relative loss per iteration (log scale), the best marked: how the fit converged."""
    from saeforge.evals.plots import have_matplotlib

    if not have_matplotlib() or not fit.history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saeforge.utils.atomic import atomic_write

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(fit.history) + 1), fit.history, lw=1.2)
    best = min(range(len(fit.history)), key=fit.history.__getitem__)
    ax.scatter([best + 1], [fit.history[best]], color="black", zorder=3, s=18, label=f"best {fit.best_loss:.4f}")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("‖X − GZ‖² / ‖X‖²")
    ax.set_title(f"SNMF of {fit.info.get('site', '')}: k = {fit.rank}, "
                 f"{fit.info.get('neurons_per_feature', '?')} neurons per feature", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return path


def run_fit(cfg: SNMFFitConfig) -> SNMF:
    fit = fit_command(cfg)
    i = fit.info
    print(f"SNMF of {cfg.site}: {fit.rank} features × {i['neurons_per_feature']} of {fit.d} neurons, "
          f"{i['tokens']:,} tokens, {i['iterations']} iterations "
          f"({'converged' if i['converged'] else 'stopped at --max-iter'}), relative loss {fit.best_loss:.4f}")
    if fit.coarse is not None:
        print(f"  hierarchy: {fit.coarse.shape[0]} coarse features; fine ≈ mixing @ coarse")
    print(f"written {cfg.out}" + (f" (feature store: saeforge serve {cfg.out})" if cfg.store else ""))
    return fit


# ---------------------------------------------------------------------------------------------------- inspect
@dataclass(frozen=True)
class SNMFInspectConfig:
    """Show what an SNMF fit holds: its convergence, and per feature its neuron group, top tokens and the tokens it
    promotes (from the feature store)."""

    path: str = field(default="", positional=True)
    """An SNMF folder (saeforge snmf fit)."""
    features: tuple[int, ...] = ()
    """Features to show (default: the first 10)."""
    neurons: int = 8
    """Neurons shown per feature (strongest first)."""


def inspect_fit(cfg: SNMFInspectConfig) -> dict:
    from saeforge.features.store import STORE_FILE, FeatureStore

    fit = SNMF.load(cfg.path)
    shown = list(cfg.features) or list(range(min(10, fit.rank)))
    bad = [f for f in shown if not 0 <= f < fit.rank]
    if bad:
        raise SaeforgeError(f"feature(s) {bad} out of range: the fit has features 0..{fit.rank - 1}",
                            f"pass --features below {fit.rank}")
    site = fit.info.get("site", "")
    store_path = Path(cfg.path) / STORE_FILE
    rows = []
    store = FeatureStore(store_path, readonly=True) if store_path.is_file() else None
    try:
        for f in shown:
            nz = fit.neurons(f)[: cfg.neurons]
            row = {"feature": f, "neurons": [[int(n), float(fit.features[f, n])] for n in nz],
                   "group_size": int((fit.features[f] != 0).sum())}
            if store is not None:
                rec = store.feature(site, f, with_examples=False)
                row.update(density=rec["density"], top_tokens=rec["top_tokens"],
                           promoted=[t for t, _ in (rec["promoted"] or [])][:8])
            rows.append(row)
    finally:
        if store is not None:
            store.close()
    return {"fit": {"rank": fit.rank, "d": fit.d, "best_loss": fit.best_loss, **fit.info}, "features": rows}


def run_inspect(cfg: SNMFInspectConfig) -> dict:
    out = inspect_fit(cfg)
    f = out["fit"]
    print(f"{cfg.path}: {f['rank']} features over {f['d']} neurons of {f.get('site')} ({f.get('model')}), relative "
          f"loss {f['best_loss']:.4f} after {f.get('iterations')} iterations")
    for r in out["features"]:
        neurons = " ".join(f"{n}:{w:+.2f}" for n, w in r["neurons"])
        print(f"  #{r['feature']:<4} {r['group_size']} neurons [{neurons}]")
        if "top_tokens" in r:
            print(f"        fires on {json.dumps([t for t, _ in r['top_tokens']], ensure_ascii=False)}, "
                  f"density {r['density']:.3f}; promotes {json.dumps(r['promoted'], ensure_ascii=False)}")
    return out
