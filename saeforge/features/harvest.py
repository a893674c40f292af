"""``saeforge harvest``: stream held-out text through the model and the SAE(s) and fill the feature store.

One forward pass per batch of contexts (stopped after the deepest SAE site); each SAE encodes the kept positions
and only its nonzero latents are kept, as (token, feature, value) triples. Memory is therefore bounded by
tokens × L0 (about 12 bytes per active latent), not by tokens × d_sae. When the stream ends, per feature: firing
density, max and mean activation, quantiles and a histogram of its nonzero activations; the top contexts (one example
per context, highest activation first); quantile-sampled contexts (activation range split into equal bins, a few
random contexts per bin); random contexts where it never fires (for scoring explanations); the tokens it fires on
most; promoted and suppressed tokens (decoder direction through the final norm scale and the unembedding); and the
nearest features by decoder cosine.

The store is built under a temporary name and then put in place by :func:`~saeforge.features.store.install_store`
(SQLite's backup API into the existing store, so a dashboard reading it sees the old or the new one and a write-ahead
log left by a killed writer is never replayed onto the new file). The whole command holds the run's writer lock, which
``explain`` takes too. Explanations of an SAE whose weights did not change carry over to the new store; when some
would be lost (the SAE changed, or is no longer in the run) harvest stops before any slow work and asks for
``--explanations discard`` (or ``keep``).
"""

from __future__ import annotations

import collections
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.features.store import STORE_FILE, WRITER_LOCK, FeatureStore, install_store
from saeforge.options import HeldOutTextOptions, RunModelAndDtypeOptions, RuntimeOptions, flat_options
from saeforge.utils.atomic import TMP_PREFIX
from saeforge.utils.locking import exclusive_lock
from saeforge.utils.threads import thread_policy

EXPLANATION_POLICIES = ("auto", "keep", "discard")


@flat_options
@dataclass(frozen=True)
class HarvestConfig:
    """Stream held-out text through the model and SAEs and fill the feature store (features.sqlite)."""

    path: str = field(default="", positional=True)
    """A run directory (every SAE under saes/) or one SAE folder."""
    tokens: int = 65_536
    """Token positions to stream (contexts × context length)."""
    batch_size: int = 16
    """Contexts per forward pass."""
    top_examples: int = 20
    """Top-activating contexts kept per feature."""
    quantile_bins: int = 10
    """Activation bins for quantile-sampled examples."""
    examples_per_bin: int = 3
    """Random contexts kept per activation bin."""
    random_examples: int = 10
    """Random contexts where the feature does not fire (used to score explanations)."""
    window_before: int = 24
    """Tokens shown before the activating token."""
    window_after: int = 8
    """Tokens shown after it."""
    n_logits: int = 10
    """Promoted and suppressed tokens kept per feature."""
    n_neighbors: int = 10
    """Nearest features (decoder cosine) kept per feature."""
    model_options: RunModelAndDtypeOptions = field(default_factory=RunModelAndDtypeOptions)
    """The model the SAEs read."""
    text_options: HeldOutTextOptions = field(default_factory=HeldOutTextOptions)
    """The held-out text streamed into the store."""
    seed: int = 0
    """Seed for the sampled examples."""
    explanations: str = "auto"
    """What happens to the explanations of an existing store: auto (carry them over for SAEs whose weights did not
    change; stop and ask when any would be lost), keep (carry them over by feature index even for changed SAEs) or
    discard (start without them)."""
    runtime_options: RuntimeOptions = field(default_factory=RuntimeOptions)
    """Where and how the model runs."""


def _window(cfg: HarvestConfig, T: int, g: int) -> tuple[int, int, int]:
    """For global token index ``g``: (context, window start, window end) in context positions."""
    ctx, pos = divmod(int(g), T)
    return ctx, max(0, pos - cfg.window_before), min(T, pos + cfg.window_after + 1)


def _window_acts(toks: np.ndarray, vals: np.ndarray, T: int, ctx: int, start: int, end: int) -> np.ndarray:
    """The feature's activations over context positions [start, end) (``toks`` sorted ascending)."""
    lo, hi = np.searchsorted(toks, [ctx * T + start, ctx * T + end])
    out = np.zeros(end - start, dtype=np.float32)
    out[toks[lo:hi] - ctx * T - start] = vals[lo:hi]
    return out


def _feature_records(cfg: HarvestConfig, rng: np.random.Generator, T: int, n_ctx: int, n_kept: int,
                     toks: np.ndarray, vals: np.ndarray, ids_flat: np.ndarray, vocab: dict[int, str],
                     kept_flat: np.ndarray):
    """Statistics and examples of one feature from its (token, value) entries (tokens ascending)."""
    n = len(vals)
    rec = {"density": n / max(n_kept, 1), "fire_count": n, "max_act": float(vals.max()) if n else 0.0,
           "mean_act": float(vals.mean()) if n else 0.0, "quantiles": None, "histogram": None, "top_tokens": []}
    examples = []
    if n:
        qs = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
        rec["quantiles"] = {str(q): float(v) for q, v in zip(qs, np.quantile(vals, qs))}
        counts, edges = np.histogram(vals, bins=24, range=(0.0, rec["max_act"]))
        rec["histogram"] = {"edges": edges.tolist(), "counts": counts.tolist()}
        order = np.argsort(-vals, kind="stable")
        top_tok = collections.Counter(ids_flat[toks[order[:100]]].tolist()).most_common(5)
        rec["top_tokens"] = [[vocab.get(t, ""), c] for t, c in top_tok]
        ctx_sorted = toks[order] // T
        _, first = np.unique(ctx_sorted, return_index=True)  # best entry of every context
        best = order[np.sort(first)[: cfg.top_examples]]
        used = set()
        for rank, e in enumerate(best):
            c, s, end = _window(cfg, T, toks[e])
            examples.append((rank, "top", c, s, int(toks[e] % T), float(vals[e]),
                             _window_acts(toks, vals, T, c, s, end)))
            used.add(c)
        edges_q = np.linspace(0.0, rec["max_act"], cfg.quantile_bins + 1)
        for b in range(cfg.quantile_bins):
            in_bin = np.nonzero((vals > edges_q[b]) & (vals <= edges_q[b + 1]))[0]
            rng.shuffle(in_bin)
            taken = 0
            for e in in_bin:
                c = int(toks[e] // T)
                if c in used:
                    continue
                c, s, end = _window(cfg, T, toks[e])
                examples.append((b, "quantile", c, s, int(toks[e] % T), float(vals[e]),
                                 _window_acts(toks, vals, T, c, s, end)))
                used.add(c)
                taken += 1
                if taken == cfg.examples_per_bin:
                    break
    firing_contexts = set((toks // T).tolist())
    quiet = [c for c in rng.permutation(n_ctx)[: cfg.random_examples * 4].tolist() if c not in firing_contexts]
    for rank, c in enumerate(quiet[: cfg.random_examples]):
        kept_pos = np.nonzero(kept_flat[c * T:(c + 1) * T])[0]
        if not len(kept_pos):
            continue
        p = int(rng.choice(kept_pos))
        _, s, end = _window(cfg, T, c * T + p)
        examples.append((rank, "random", c, s, p, 0.0, np.zeros(end - s, dtype=np.float32)))
    return rec, examples


def sae_weights_hash(sae) -> str:
    """SHA-256 of an SAE's configuration and weights: the same hash means the same features."""
    h = hashlib.sha256(json.dumps(sae.cfg.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(sae.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_config(cfg: HarvestConfig) -> None:
    """Refuse bad settings before anything loads."""
    if not cfg.path:
        raise SaeforgeError("no run or SAE folder given", "saeforge harvest RUN_DIR")
    if cfg.tokens <= 0:
        raise SaeforgeError(f"--tokens {cfg.tokens} asks for no tokens; harvest would replace the store with an "
                            "empty one", f"pass a positive count, e.g. saeforge harvest {cfg.path} --tokens 65536")
    for name in ("batch_size", "top_examples", "quantile_bins"):
        if getattr(cfg, name) < 1:
            raise SaeforgeError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be at least 1",
                                f"saeforge harvest {cfg.path} --{name.replace('_', '-')} "
                                f"{getattr(HarvestConfig(), name)}")
    for name in ("examples_per_bin", "random_examples", "window_before", "window_after", "n_logits", "n_neighbors",
                 "context_length"):
        if getattr(cfg, name) < 0:
            raise SaeforgeError(f"--{name.replace('_', '-')} {getattr(cfg, name)} is negative",
                                f"pass 0 or more: saeforge harvest {cfg.path} --{name.replace('_', '-')} "
                                f"{getattr(HarvestConfig(), name)}")
    if cfg.explanations not in EXPLANATION_POLICIES:
        raise SaeforgeError(f"unknown --explanations {cfg.explanations!r}",
                            f"use one of {', '.join(EXPLANATION_POLICIES)}")
    from saeforge.data.text_source import TextSource

    TextSource(cfg.corpus, cfg.text_field).check()


def _previous_explanations(cfg: HarvestConfig, out: Path, hashes: dict[str, str]) -> dict:
    """What the existing store's explanations become: ``{"keep": {sae: records}, "dropped": {sae: (n, reason)},
    "unreadable": reason or None}``. Raises (auto) when some would be dropped, before any slow work."""
    plan: dict = {"keep": {}, "dropped": {}, "unreadable": None, "links": [], "links_dropped": 0}
    if not out.is_file():
        return plan
    try:
        with FeatureStore(out) as old:  # writable: an older schema is migrated (this process holds the lock)
            # links (flow matches, tree edges) come from the weights alone: they carry over between SAEs that are
            # both still in the run, unchanged
            unchanged = {s["name"] for s in old.saes()
                         if s["name"] in hashes and s.get("weights_hash") == hashes[s["name"]]}
            for group in old.link_summary():
                if group["src_sae"] in unchanged and group["dst_sae"] in unchanged:
                    rows = [(r["src_idx"], r["dst_idx"], r["weight"], r["data"])
                            for r in old.links_between(group["kind"], group["src_sae"], group["dst_sae"])]
                    plan["links"].append((group["kind"], group["src_sae"], group["dst_sae"], rows))
                else:
                    plan["links_dropped"] += int(group["n"])
            for s in old.saes():
                records = old.explanation_records(s["name"])
                if not records:
                    continue
                if s["name"] not in hashes:
                    plan["dropped"][s["name"]] = (len(records), "this SAE is no longer in the run")
                elif cfg.explanations == "discard":
                    plan["dropped"][s["name"]] = (len(records), "--explanations discard")
                elif s.get("weights_hash") == hashes[s["name"]] or cfg.explanations == "keep":
                    plan["keep"][s["name"]] = records
                else:
                    why = ("its weights changed since the last harvest" if s.get("weights_hash")
                           else "the store predates weight hashes, so it cannot tell whether the SAE changed")
                    plan["dropped"][s["name"]] = (len(records), why)
    except SaeforgeError as err:
        if "newer than this saeforge reads" in err.problem:
            raise  # written by a newer saeforge: replacing it would lose what this one cannot even read
        plan["unreadable"] = err.problem  # damaged or not a store: replaced, and the summary says so
        return plan
    lost = {n: v for n, v in plan["dropped"].items() if cfg.explanations == "auto"}
    if lost:
        total = sum(n for n, _ in lost.values())
        detail = "; ".join(f"{name}: {n} ({why})" for name, (n, why) in lost.items())
        fix = f"saeforge harvest {cfg.path} --explanations discard   (start without them)"
        if any(name in hashes for name in lost):
            fix += (", or --explanations keep   (carry them over by feature index: only right if the features are "
                    "the same)")
        raise SaeforgeError(f"harvesting again would drop {total} explanation(s) of {out}: {detail}", fix)
    return plan


def harvest(cfg: HarvestConfig) -> Path:
    """Harvest into ``<path>/features.sqlite`` (see the module docstring); returns the store's path. The store's meta
    ``explanations_kept`` / ``explanations_dropped`` say what became of the previous store's explanations."""
    check_config(cfg)
    root = Path(cfg.path)
    if not root.exists():
        raise SaeforgeError(f"{root} does not exist", "pass a run directory from `saeforge train` or an SAE folder")
    from saeforge.distributed.harvesting import BatchShare

    share = BatchShare(cfg.device)  # under torchrun: each rank its share of the batches, rank 0 writes
    try:
        with share.main_only(exclusive_lock(root, WRITER_LOCK)), thread_policy(cfg.threads):
            return _harvest_locked(cfg, root, share)
    finally:
        share.close()


def _harvest_locked(cfg: HarvestConfig, root: Path, share) -> Path:
    from tqdm.auto import tqdm

    from saeforge.data.text_source import TextSource
    from saeforge.data.token_stream import TokenStream
    from saeforge.runs import compact_sites, load_run

    run = load_run(root, model=cfg.model, device=share.device, dtype=cfg.dtype)
    lm, model_name = run.lm, cfg.model or run.meta.get("model_name")
    saes = {name: (r.sae, r, r.folder) for name, r in run.saes.items()}
    hashes = {name: sae_weights_hash(sae) for name, (sae, _, _) in saes.items()}
    out = root / STORE_FILE
    previous = _previous_explanations(cfg, out, hashes)
    T = run.context_length(cfg.context_length)
    tokens = TokenStream.for_model(TextSource(cfg.corpus, cfg.text_field), lm, run.token_policy(T))
    n_target = max(1, -(-cfg.tokens // T))
    sites = run.sites

    entries = {n: ([], [], []) for n in saes}
    all_ids, all_kept = [], []
    n_ctx = 0
    t0 = time.time()
    bar = tqdm(total=n_target * T, unit="tok", unit_scale=True, desc="harvesting", disable=not cfg.progress,
               dynamic_ncols=True)
    for b, (_, ids) in enumerate(tokens.batches(cfg.batch_size)):
        ids = ids[: n_target - n_ctx]
        keep = tokens.keep_mask(ids)
        if share.mine(b):
            acts = lm.read(ids, sites)
            flat_index = (torch.arange(ids.numel()) + n_ctx * T).view(ids.shape)[keep]
            keep_dev = keep.to(lm.device)
            with torch.inference_mode():
                for name, (sae, bound, _) in saes.items():
                    f = sae.encode(bound.input(acts, keep_dev).float())
                    rows, feats = (f != 0).nonzero(as_tuple=True)
                    entries[name][0].append(flat_index[rows.cpu()].numpy())
                    entries[name][1].append(feats.cpu().numpy().astype(np.int32))
                    entries[name][2].append(f[rows, feats].float().cpu().numpy())
        all_ids.append(ids.numpy().astype(np.int32))
        all_kept.append(keep.numpy())
        n_ctx += ids.shape[0]
        bar.update(ids.numel())
        if n_ctx >= n_target:
            break
    bar.close()
    entries = share.merge(entries)  # the triples are sorted below, so the ranks' order does not matter
    if entries is None:
        return root / STORE_FILE  # rank 0 writes it
    stream_seconds = time.time() - t0
    if n_ctx == 0:
        raise SaeforgeError(f"the corpus {cfg.corpus!r} gave no tokens", "use a larger corpus")
    ids_all = np.concatenate(all_ids)
    ids_flat = ids_all.reshape(-1)
    kept_flat = np.concatenate(all_kept).reshape(-1)
    n_kept = int(kept_flat.sum())
    vocab = {int(i): lm.tokenizer.decode([int(i)]) for i in np.unique(ids_flat)}

    tmp = root / f"{TMP_PREFIX}{STORE_FILE}"
    for leftover in (tmp, *(tmp.with_name(tmp.name + s) for s in ("-wal", "-shm", "-journal"))):
        leftover.unlink(missing_ok=True)  # of a killed harvest
    store = FeatureStore(tmp, create=True)
    try:
        store.begin_bulk_load()
        store.add_contexts(ids_all, 0)
        store.add_vocab(vocab)
        rng = np.random.default_rng(cfg.seed)
        for name, (sae, bound, folder) in saes.items():
            toks = np.concatenate(entries[name][0]) if entries[name][0] else np.zeros(0, np.int64)
            feats = np.concatenate(entries[name][1]) if entries[name][1] else np.zeros(0, np.int32)
            vals = np.concatenate(entries[name][2]) if entries[name][2] else np.zeros(0, np.float32)
            order = np.lexsort((toks, feats))
            toks, feats, vals = toks[order], feats[order], vals[order]
            bounds = np.searchsorted(feats, np.arange(sae.cfg.d_sae + 1))
            logit_info = _logit_effects(lm, sae, vocab_fn=lambda ids: [lm.tokenizer.decode([i]) for i in ids],
                                        n=cfg.n_logits)
            neighbors = _neighbors(sae, cfg.n_neighbors)
            sae_id = store.add_sae(name, compact_sites([s.name for s in bound.reads]), sae.cfg.d_sae,
                                   sae.cfg.architecture, str(folder), hashes[name])
            records, examples = [], []
            for i in tqdm(range(sae.cfg.d_sae), desc=f"features of {name}", disable=not cfg.progress,
                          dynamic_ncols=True, leave=False):
                lo, hi = bounds[i], bounds[i + 1]
                rec, ex = _feature_records(cfg, rng, T, n_ctx, n_kept, toks[lo:hi], vals[lo:hi], ids_flat, vocab,
                                           kept_flat)
                rec["idx"] = i
                rec["promoted"], rec["suppressed"] = logit_info[i] if logit_info else (None, None)
                rec["neighbors"] = neighbors[i]
                records.append(rec)
                examples.extend((i, kind, rank, c, s, p, m, a) for rank, kind, c, s, p, m, a in ex)
            store.add_features(sae_id, records)
            store.add_examples(sae_id, examples)
            _heatmap(folder, name, toks, feats, vals, T, ids_all, vocab, sae.cfg.d_sae)
        store.set_meta("model", model_name)
        store.set_meta("corpus", cfg.corpus)
        store.set_meta("context_length", T)
        store.set_meta("n_contexts", n_ctx)
        store.set_meta("n_tokens", int(n_ctx * T))
        store.set_meta("n_kept_tokens", n_kept)
        store.set_meta("stream_tokens_per_s", n_ctx * T / max(stream_seconds, 1e-9))
        store.set_meta("harvest_seconds", time.time() - t0)
        kept = {name: store.restore_explanations(name, records) for name, records in previous["keep"].items()}
        store.set_meta("explanations_kept", kept)
        for kind, src, dst, rows in previous["links"]:
            store.add_links(kind, src, dst, rows)
        store.set_meta("links_kept", sum(len(rows) for *_, rows in previous["links"]))
        store.set_meta("links_dropped", previous["links_dropped"])
        store.set_meta("explanations_dropped", {n: {"count": c, "reason": why}
                                                for n, (c, why) in previous["dropped"].items()})
        if previous["unreadable"]:
            store.set_meta("previous_store_unreadable", previous["unreadable"])
        store.end_bulk_load()
        store.close()
        install_store(tmp, out)
    except BaseException:
        store.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _heatmap(folder: Path, name: str, toks, feats, vals, T: int, ids_all, vocab, d_sae: int,
             n_features: int = 40, n_samples: int = 48) -> Path | None:
    """plots/activation_heatmap.png: max activation per sample (context) of the most frequently firing features."""
    from saeforge.evals.plots import activation_heatmap, have_matplotlib

    if not have_matplotlib() or not len(vals):
        return None
    counts = np.bincount(feats, minlength=d_sae)
    top = np.argsort(-counts, kind="stable")[:n_features]
    n_samples = min(n_samples, ids_all.shape[0])
    grid = np.zeros((n_samples, len(top)), dtype=np.float32)
    ctx = toks // T
    for j, f in enumerate(top):
        sel = (feats == f) & (ctx < n_samples)
        np.maximum.at(grid[:, j], ctx[sel], vals[sel])
    labels = ["".join(vocab.get(int(t), "") for t in ids_all[c, 1:9]).replace("\n", " ")[:28] for c in range(n_samples)]
    return activation_heatmap(folder / "plots" / "activation_heatmap.png", name, torch.from_numpy(grid),
                              top.tolist(), labels)


@torch.no_grad()
def _logit_effects(lm, sae, vocab_fn, n: int, chunk: int = 512):
    """Per feature: ([token, logit] promoted, [token, logit] suppressed), or None if the SAE does not write to
    the residual stream width."""
    if sae.cfg.d_output != lm.d_model or n <= 0:
        return None
    out = []
    W = sae.W_dec.detach()
    for s in range(0, W.shape[0], chunk):
        logits = lm.direction_logits(W[s:s + chunk].float())
        top = logits.topk(n, dim=-1)
        bot = logits.topk(n, dim=-1, largest=False)
        for tv, ti, bv, bi in zip(top.values, top.indices, bot.values, bot.indices):
            out.append(([[t, float(v)] for t, v in zip(vocab_fn(ti.tolist()), tv.tolist())],
                        [[t, float(v)] for t, v in zip(vocab_fn(bi.tolist()), bv.tolist())]))
    return out


@torch.no_grad()
def _neighbors(sae, n: int, chunk: int = 1024) -> list[list]:
    d_sae = int(sae.cfg.d_sae)
    if hasattr(sae, "decoder_cosines"):  # a CLT: decoders of several widths (its layers write different sites)
        cosines = sae.decoder_cosines
    else:
        W = sae.W_dec.detach().float()
        W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)

        def cosines(start: int, stop: int):
            return W[start:stop] @ W.T
    n = min(n, d_sae - 1)
    out = []
    for s in range(0, d_sae, chunk):
        sims = cosines(s, min(s + chunk, d_sae))
        sims[torch.arange(sims.shape[0]), torch.arange(s, s + sims.shape[0])] = -2.0  # not itself
        top = sims.topk(n, dim=-1) if n > 0 else None
        for r in range(sims.shape[0]):
            out.append([] if top is None else [[int(i), float(v)] for i, v in zip(top.indices[r], top.values[r])])
    return out


def run_harvest(cfg: HarvestConfig) -> Path:
    path = harvest(cfg)
    with FeatureStore(path, readonly=True) as store:
        m = store.all_meta()
        saes = store.saes()
    print(f"harvested {m['n_tokens']:,} token positions of {m['corpus']} at "
          f"{m['stream_tokens_per_s']:,.0f} tokens/s into {path}")
    for s in saes:
        print(f"  {s['name']}: {s['d_sae']} features ({s['architecture']}, {s['site']})")
    for name, n in (m.get("explanations_kept") or {}).items():
        if n:
            print(f"  kept {n} explanation(s) of {name} from the previous store (same SAE weights)")
    for name, d in (m.get("explanations_dropped") or {}).items():
        print(f"  dropped {d['count']} explanation(s) of {name}: {d['reason']}")
    if m.get("links_kept"):
        print(f"  kept {m['links_kept']:,} link(s) between features (flow matches, tree edges) of unchanged SAEs")
    if m.get("links_dropped"):
        print(f"  dropped {m['links_dropped']:,} link(s) touching SAEs that changed or left the run; recompute them "
              f"(e.g. saeforge flow match)")
    if m.get("previous_store_unreadable"):
        print(f"  the previous store could not be read, so no explanation was carried over: "
              f"{m['previous_store_unreadable']}")
    return path
