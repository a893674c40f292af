"""``saeforge diff``: diff two models through a crosscoder trained on both.

1. **Check** that the two models can be compared position by position: the same width at the site and the same
   tokenizer (every token id the same string, the same special tokens), naming what differs otherwise, before any
   slow work.
2. **Pair activations**: both models read the same contexts (packed, BOS first, special positions left out); the
   site's activation of model A and of model B at every kept position go to ``activations/a.npy`` and ``b.npy``. The
   text mixes the ``corpus`` with the ``focus_text`` (by default the text model B was fine-tuned on, from its
   ``finetune.json``) so that what the fine-tune changed is there to be found: every ``1 / focus_fraction``-th
   context comes from the focus text (cycled).
3. **Train** a crosscoder over the two sites (``a--SITE`` and ``b--SITE``) with the one training loop
   (:func:`saeforge.training.train_on_arrays`; each model's site normalised on its own): ``run/``, resumable.
4. **Analyse** (:mod:`saeforge.diffing.analysis`): relative decoder norms, their histogram (``relative_norms.png``),
   the shared and exclusive latents, and for every exclusive latent its top examples on held-out text of both kinds
   (the focus text and ``eval_corpus``) and how often it fires on each: ``diff.json``.

Every step skips what a previous run of the same command finished, so a killed ``saeforge diff`` is resumed by
running it again (the activation pass restarts; training resumes from its checkpoint).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from saeforge.errors import SaeforgeError
from saeforge.runs import MODEL_SITE_SEPARATOR
from saeforge.utils.atomic import atomic_write, atomic_write_json
from saeforge.utils.locking import exclusive_lock
from saeforge.utils.threads import thread_policy

__all__ = ["DiffConfig", "check_pair", "diff_models", "run_diff"]

CROSSCODER = "crosscoder"
PAIRS_FILE = "pairs.json"


@dataclass(frozen=True)
class DiffConfig:
    """Diff two models (e.g. a model and its fine-tune, `saeforge finetune`) through a crosscoder trained on one
    site of both: shared and exclusive features by relative decoder norms, with the exclusive ones' top examples."""

    out: str = ""
    """Folder for everything: activations/, run/ (the crosscoder), diff.json, relative_norms.png."""
    model_a: str = "embedded"
    """The first model (the base)."""
    model_b: str = ""
    """The second model (e.g. the folder `saeforge finetune` wrote); it must share model A's width and tokenizer."""
    site: str = "layers.12.resid_post"
    """The site read in both models."""
    corpus: str = "embedded:train"
    """Text both models read to train the crosscoder."""
    focus_text: str = ""
    """Text mixed into the corpus (and evaluated separately); empty: the text model B was fine-tuned on (its
    finetune.json), if it says."""
    focus_fraction: float = 0.25
    """Share of the training contexts taken from the focus text."""
    tokens: int = 120_000
    """Activation rows per model to train on."""
    context_length: int = 128
    """Tokens per context, BOS included."""
    train_tokens: int = 0
    """Training tokens (passes over the rows x rows); 0: 4 x --tokens."""
    batch_size: int = 2048
    """Rows per training step."""
    architecture: str = "topk_crosscoder"
    """A crosscoder architecture: topk_crosscoder, batchtopk_crosscoder or jumprelu_crosscoder."""
    k: int = 32
    """Active latents per token (TopK codes)."""
    d_sae: int = 0
    """Latents; 0: 8 x the site's width."""
    eval_corpus: str = "embedded:validation"
    """Held-out text for the analysis (besides the focus text)."""
    eval_tokens: int = 16_384
    """Tokens of each held-out text (the focus text and eval_corpus) to analyse."""
    exclusive: float = 0.1
    """Exclusive to A: relative norm <= this; to B: >= 1 - this."""
    shared: float = 0.1
    """Shared: |relative norm - 0.5| <= this."""
    top_examples: int = 8
    """Top examples kept per exclusive latent."""
    show: int = 10
    """Exclusive latents printed (all of them go to diff.json)."""
    dtype: str = "float32"
    """dtype both models run in."""
    threads: int = 0
    """CPU threads; 0: automatic."""
    progress: bool = True
    """Show progress bars."""
    seed: int = 0
    """Seed of the crosscoder's training."""

    def validate(self) -> None:
        def need(ok: bool, problem: str, fix: str) -> None:
            if not ok:
                raise SaeforgeError(problem, fix)

        need(bool(self.out), "no output folder given", "pass --out DIFF_DIR")
        need(bool(self.model_b), "no second model given", "pass --model-b FOLDER (e.g. what `saeforge finetune` wrote)")
        need(0 <= self.focus_fraction < 1, f"--focus-fraction must lie in [0, 1), got {self.focus_fraction}",
             "pass --focus-fraction 0.25")
        need(self.tokens >= self.batch_size, f"--tokens {self.tokens} is less than one batch of {self.batch_size}",
             f"pass --tokens {max(self.batch_size, 120_000)}")
        need(self.eval_tokens > 0 and self.top_examples > 0, "--eval-tokens and --top-examples must be positive",
             "pass --eval-tokens 16384 --top-examples 8")
        from saeforge.saes import get_config_class

        need("crosscoder" in get_config_class(self.architecture).binding_kinds,
             f"--architecture {self.architecture} is not a crosscoder", "pass --architecture topk_crosscoder")


# ---------------------------------------------------------------------------------------------------- checks
def check_pair(lm_a, lm_b, site: str) -> None:
    """Refuse two models that cannot be diffed position by position, saying what differs."""
    sa, sb = lm_a.site(site), lm_b.site(site)
    if sa.d != sb.d:
        raise SaeforgeError(f"the models differ in width at {site}: model A ({lm_a.name}) has {sa.d}, model B "
                            f"({lm_b.name}) has {sb.d}; a crosscoder reads both at one width",
                            "diff two models of the same architecture (e.g. a model and its fine-tune)")
    va, vb = lm_a.tokenizer.get_vocab(), lm_b.tokenizer.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb))[:5]
        only_b = sorted(set(vb) - set(va))[:5]
        moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])[:5]
        detail = (f"model A has {len(va)} tokens, model B {len(vb)}" + (f"; only A has {only_a}" if only_a else "")
                  + (f"; only B has {only_b}" if only_b else "") + (f"; ids differ for {moved}" if moved else ""))
        raise SaeforgeError(f"the models have different tokenizers ({detail}), so the same text is not the same "
                            "positions in both", "diff two models that share a tokenizer (e.g. a model and its "
                            "fine-tune)")
    ids_a = (lm_a.bos_token_id(), lm_a.tokenizer.eos_token_id, sorted(lm_a.special_token_ids()))
    ids_b = (lm_b.bos_token_id(), lm_b.tokenizer.eos_token_id, sorted(lm_b.special_token_ids()))
    if ids_a != ids_b:
        raise SaeforgeError(f"the models' special tokens differ (BOS, EOS, specials: A {ids_a}, B {ids_b})",
                            "diff two models that share a tokenizer and its special tokens")


def _focus_from_finetune(model_b: str) -> str:
    info = Path(model_b) / "finetune.json"
    if info.is_file():
        try:
            return str(json.loads(info.read_text()).get("text") or "")
        except (OSError, json.JSONDecodeError):
            return ""
    return ""


# ---------------------------------------------------------------------------------------------------- pairs
def _mixed_contexts(corpus, focus, fraction: float) -> Iterator[tuple[str, np.ndarray]]:
    """Contexts of ``corpus`` with every ``1/fraction``-th one from ``focus`` (cycled when it runs out)."""
    every = round(1 / fraction) if fraction > 0 and focus is not None else 0
    main = corpus.contexts()
    side = focus.contexts() if every else None
    i = 0
    for ctx in main:
        if every and i % every == every - 1:
            try:
                yield "focus", next(side)
            except StopIteration:
                side = focus.contexts()
                yield "focus", next(side)
        else:
            yield "other", ctx
        i += 1


def _stream(spec: str, lm, context_length: int):
    from saeforge.data.text_source import TextSource
    from saeforge.data.token_stream import TokenPolicy, TokenStream

    return TokenStream.for_model(TextSource(spec), lm, TokenPolicy(context_length, True, True))


@torch.no_grad()
def _collect_pairs(cfg: DiffConfig, lm_a, lm_b, folder: Path, focus: str) -> tuple[Path, Path]:
    from tqdm.auto import tqdm

    done = folder / PAIRS_FILE
    identity = {"model_a": cfg.model_a, "model_b": cfg.model_b, "fingerprint_a": lm_a.fingerprint(),
                "fingerprint_b": lm_b.fingerprint(), "site": cfg.site, "corpus": cfg.corpus, "focus_text": focus,
                "focus_fraction": cfg.focus_fraction, "tokens": cfg.tokens, "context_length": cfg.context_length}
    a_path, b_path = folder / "a.npy", folder / "b.npy"
    if done.is_file() and json.loads(done.read_text()).get("identity") == identity:
        return a_path, b_path
    if done.is_file():
        raise SaeforgeError(f"{folder} holds activations of other settings", "use another --out, or delete it")
    folder.mkdir(parents=True, exist_ok=True)
    d = lm_a.site(cfg.site).d
    stores = {p: np.lib.format.open_memmap(p.with_suffix(".partial.npy"), mode="w+", dtype=np.float32,
                                           shape=(cfg.tokens, d)) for p in (a_path, b_path)}
    stream = _stream(cfg.corpus, lm_a, cfg.context_length)
    focus_stream = _stream(focus, lm_a, cfg.context_length) if focus and cfg.focus_fraction > 0 else None
    n, sources = 0, {"focus": 0, "other": 0}
    bar = tqdm(total=cfg.tokens, unit="tok", unit_scale=True, desc="pairing activations", disable=not cfg.progress,
               dynamic_ncols=True)
    batch: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        nonlocal n
        ids = torch.from_numpy(np.stack([c for _, c in batch]))
        keep = stream.keep_mask(ids)
        rows = {}
        for lm, path in ((lm_a, a_path), (lm_b, b_path)):
            rows[path] = lm.read(ids.to(lm.device), [cfg.site])[cfg.site][keep.to(lm.device)].float().cpu().numpy()
        take = min(len(rows[a_path]), cfg.tokens - n)
        for path, r in rows.items():
            stores[path][n:n + take] = r[:take]
        for (src, _), k in zip(batch, keep.sum(1).tolist()):
            sources[src] += k
        n += take
        bar.update(take)
        batch.clear()

    for src, ctx in _mixed_contexts(stream, focus_stream, cfg.focus_fraction):
        batch.append((src, ctx))
        if len(batch) == 8:
            flush()
            if n >= cfg.tokens:
                break
    if batch and n < cfg.tokens:
        flush()
    bar.close()
    if n < cfg.tokens:
        raise SaeforgeError(f"the corpus gave only {n} positions, fewer than --tokens {cfg.tokens}",
                            f"pass --tokens {n - n % cfg.batch_size} or a larger --corpus")
    for path, store in stores.items():
        store.flush()
        del store
        path.with_suffix(".partial.npy").replace(path)
    atomic_write_json(done, {"identity": identity, "rows": n, "rows_by_source": sources})
    return a_path, b_path


# ---------------------------------------------------------------------------------------------------- training
def _train(cfg: DiffConfig, a_path: Path, b_path: Path, out: Path, d: int) -> Path:
    from saeforge.training import TrainConfig, train, train_on_arrays
    from saeforge.training.run_dir import read_run_info

    run = out / "run"
    site_a, site_b = f"a{MODEL_SITE_SEPARATOR}{cfg.site}", f"b{MODEL_SITE_SEPARATOR}{cfg.site}"
    if (run / "run.json").is_file():
        if read_run_info(run).get("status") != "complete":
            train(TrainConfig(resume=str(run), progress=cfg.progress, threads=cfg.threads), ["resume", "progress"])
        return run / "saes" / CROSSCODER
    spec = {"site": [site_a, site_b], "name": CROSSCODER, "architecture": cfg.architecture, "k": cfg.k,
            "d_sae": cfg.d_sae or 8 * d}
    tcfg = TrainConfig(out=str(run), saes=(spec,), tokens=cfg.train_tokens or 4 * cfg.tokens,
                       batch_size=cfg.batch_size, seed=cfg.seed, progress=cfg.progress, threads=cfg.threads,
                       device="cpu", log_every=10, checkpoint_every=100)
    train_on_arrays({site_a: a_path, site_b: b_path}, tcfg, cache_dir=out / "cache")
    return run / "saes" / CROSSCODER


# ---------------------------------------------------------------------------------------------------- analysis
def _snippet(tokenizer, ids: np.ndarray, pos: int, before: int = 12, after: int = 3) -> dict[str, str]:
    lo, hi = max(1, pos - before), min(len(ids), pos + after + 1)
    return {"before": tokenizer.decode(ids[lo:pos].tolist()), "token": tokenizer.decode([int(ids[pos])]),
            "after": tokenizer.decode(ids[pos + 1:hi].tolist())}


@torch.no_grad()
def _analyse(cfg: DiffConfig, lm_a, lm_b, sae_folder: Path, focus: str, out: Path) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from saeforge.diffing.analysis import (
        ExampleTracker,
        classify,
        decoder_cosines,
        lean_by_text,
        norm_histogram,
        relative_norms,
    )
    from saeforge.saes import load_sae, read_sae_config

    sae = load_sae(sae_folder).eval()
    meta = read_sae_config(sae_folder).get("metadata", {})
    scales = (meta.get("normalization") or {}).get("scale_out")
    r = relative_norms(sae, scales)
    cos = decoder_cosines(sae)
    texts = [("focus", focus)] if focus else []
    texts.append(("other", cfg.eval_corpus))
    contexts: dict[str, list[np.ndarray]] = {}
    per_text_tokens = {}
    latents_seen = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    encoded: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for source, spec in texts:
        stream = _stream(spec, lm_a, cfg.context_length)
        contexts[source] = []
        n = 0
        bar = tqdm(total=cfg.eval_tokens, unit="tok", unit_scale=True, desc=f"analysing ({source})",
                   disable=not cfg.progress, dynamic_ncols=True)
        for first, ids in stream.batches(8):
            keep = stream.keep_mask(ids)
            xa = lm_a.read(ids, [cfg.site])[cfg.site][keep].float()
            xb = lm_b.read(ids, [cfg.site])[cfg.site][keep].float()
            f = sae.encode(torch.cat([xa, xb], -1))
            where = keep.nonzero()
            encoded.append((source, f.to_sparse(), where[:, 0] + len(contexts[source]), where[:, 1]))
            contexts[source].extend(ids.numpy())
            latents_seen += (f > 0).sum(0).cpu()
            n += int(keep.sum())
            bar.update(int(keep.sum()))
            if n >= cfg.eval_tokens:
                break
        bar.close()
        per_text_tokens[source] = n
    alive = latents_seen > 0
    classes = classify(r, alive, exclusive=cfg.exclusive, shared=cfg.shared)
    order_b = classes.exclusive_b[torch.argsort(r[classes.exclusive_b], descending=True)]
    order_a = classes.exclusive_a[torch.argsort(r[classes.exclusive_a])]
    alive_idx = torch.nonzero(alive).flatten()
    most_b = alive_idx[torch.argsort(r[alive_idx], descending=True)][:cfg.show]
    watched = sorted(set(order_b.tolist()) | set(order_a.tolist()) | set(most_b.tolist()))
    tracker = ExampleTracker(watched, n=cfg.top_examples, sources=[s for s, _ in texts])
    for source, f_sparse, ctx, pos in encoded:
        tracker.update(source, f_sparse.to_dense(), ctx, pos, sae.cfg.d_sae)

    def describe(j: int) -> dict[str, Any]:
        rates = tracker.rates(j)
        item = {"latent": int(j), "relative_norm": float(r[j]), "decoder_cosine": float(cos[j]),
                "firing_rate": rates, "examples": []}
        if "focus" in rates:
            item["focus_share_of_top_examples"] = tracker.focus_share(j)
        for value, source, c, p in tracker.top(j):
            item["examples"].append({"activation": round(value, 4), "source": source,
                                     **_snippet(lm_a.tokenizer, contexts[source][c], p)})
        return item

    def rate_ratio(idx: torch.Tensor) -> float | None:
        if "focus" not in tracker.fired or idx.numel() == 0:
            return None
        focus_rate = tracker.fired["focus"][idx].sum().item() / max(tracker.tokens["focus"], 1)
        other_rate = tracker.fired["other"][idx].sum().item() / max(tracker.tokens["other"], 1)
        return focus_rate / other_rate if other_rate > 0 else math.inf

    shared_cos = cos[classes.shared]
    report: dict[str, Any] = {
        "relative_norm": "||d_B|| / (||d_A|| + ||d_B||) in the normalised space the crosscoder was trained in",
        "counts": classes.counts(),
        "histogram": norm_histogram(r, alive),
        "shared_decoder_cosine": {"mean": float(shared_cos.mean()) if shared_cos.numel() else None,
                                  "quantiles": {str(q): float(torch.quantile(shared_cos, q))
                                                for q in (0.1, 0.5, 0.9)} if shared_cos.numel() else {}},
        "eval_tokens": per_text_tokens,
        "focus_vs_other_firing_ratio": {"exclusive_b": rate_ratio(classes.exclusive_b),
                                        "exclusive_a": rate_ratio(classes.exclusive_a),
                                        "shared": rate_ratio(classes.shared), "all_alive": rate_ratio(alive_idx)},
        "lean_by_text": lean_by_text(r, cos, tracker.fired["focus"], tracker.tokens["focus"], tracker.fired["other"],
                                     tracker.tokens["other"]) if "focus" in tracker.fired else None,
        "exclusive_b": [describe(j) for j in order_b.tolist()],
        "exclusive_a": [describe(j) for j in order_a.tolist()],
        "most_b_specific": [describe(j) for j in most_b.tolist()],
    }
    _plot(r, alive, classes, cfg, out / "relative_norms.png", report)
    return report


def _plot(r: torch.Tensor, alive: torch.Tensor, classes, cfg: DiffConfig, path: Path, report: dict) -> None:
    from saeforge.evals.plots import have_matplotlib

    if not have_matplotlib():
        report["plot"] = "matplotlib is not installed: pip install 'saeforge[plots]'"
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.hist(r[alive].numpy(), bins=50, range=(0, 1), color="#4c72b0")
    ax.set_yscale("log")
    for lo, hi, color in ((0, cfg.exclusive, "#dd8452"), (1 - cfg.exclusive, 1, "#55a868"),
                          (0.5 - cfg.shared, 0.5 + cfg.shared, "#8172b3")):
        ax.axvspan(lo, hi, color=color, alpha=0.15)
    c = classes.counts()
    ax.set(xlabel="relative decoder norm  ||d_B|| / (||d_A|| + ||d_B||)", ylabel="latents (log)",
           title=f"A-only {c['exclusive_a']}, shared {c['shared']}, B-only {c['exclusive_b']} "
                 f"(of {int(alive.sum())} alive)")
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    report["plot"] = str(path)


# ---------------------------------------------------------------------------------------------------- entry
def diff_models(cfg: DiffConfig) -> dict[str, Any]:
    """Run (or resume) the diff; returns the content of ``diff.json``."""
    from saeforge.models.language_model import LanguageModel

    cfg.validate()
    out = Path(cfg.out)
    with exclusive_lock(out, "saeforge diff"), thread_policy(cfg.threads):
        lm_a = LanguageModel.load(cfg.model_a, dtype=cfg.dtype, device="cpu")
        lm_b = LanguageModel.load(cfg.model_b, dtype=cfg.dtype, device="cpu")
        check_pair(lm_a, lm_b, cfg.site)
        focus = cfg.focus_text or _focus_from_finetune(cfg.model_b)
        t0 = time.time()
        a_path, b_path = _collect_pairs(cfg, lm_a, lm_b, out / "activations", focus)
        sae_folder = _train(cfg, a_path, b_path, out, lm_a.site(cfg.site).d)
        report = {"format": "saeforge-diff", "models": {"a": cfg.model_a, "b": cfg.model_b}, "site": cfg.site,
                  "focus_text": focus, "crosscoder": str(sae_folder), "config": asdict(cfg)}
        finetune = Path(cfg.model_b) / "finetune.json"
        if finetune.is_file():
            report["finetune"] = {k: v for k, v in json.loads(finetune.read_text()).items()
                                  if k in ("text", "loss_before", "loss_after", "tokens_seen", "config")}
        report.update(_analyse(cfg, lm_a, lm_b, sae_folder, focus, out))
        report["seconds_this_session"] = round(time.time() - t0, 1)
        atomic_write_json(out / "diff.json", report)
    return report


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def run_diff(cfg: DiffConfig) -> dict[str, Any]:
    report = diff_models(cfg)
    c = report["counts"]
    print(f"crosscoder over {report['site']} of A={report['models']['a']} and B={report['models']['b']}: "
          f"{c['exclusive_a']} latents only A has, {c['exclusive_b']} only B has, {c['shared']} shared, "
          f"{c['other']} in between, {c['dead']} silent on the held-out text")
    ratio = report["focus_vs_other_firing_ratio"]
    if ratio.get("exclusive_b") is not None:
        print(f"firing on the focus text vs other text: B-only latents {ratio['exclusive_b']:.2f}x, shared "
              f"{ratio['shared']:.2f}x, all {ratio['all_alive']:.2f}x")
    lean = report.get("lean_by_text")
    if lean:
        g = lean["groups"]
        print(f"latents firing >= {lean['ratio']:g}x as often on the focus text: {g['focus']['latents']} (mean r "
              f"{_fmt(g['focus']['mean_relative_norm'])}, decoder cosine {_fmt(g['focus']['mean_decoder_cosine'])}); "
              f"on both: {g['both']['latents']} (r {_fmt(g['both']['mean_relative_norm'])}, cosine "
              f"{_fmt(g['both']['mean_decoder_cosine'])}); rank correlation of r with the focus/other firing ratio "
              f"{_fmt(lean['spearman_relative_norm'])}")
    for item in (report["exclusive_b"] or report["most_b_specific"])[:cfg.show]:
        ex = item["examples"][0] if item["examples"] else None
        shown = f"...{ex['before']}[[{ex['token']}]]{ex['after']}... ({ex['source']})" if ex else "(no examples)"
        print(f"  latent {item['latent']:>5}  r={item['relative_norm']:.3f}  {shown!r}")
    print(f"written {Path(cfg.out) / 'diff.json'}")
    return report
