"""SNMF features in the feature store (``features.sqlite``), so the dashboard, ``inspect``-style tools and anything
reading a :class:`~saeforge.features.store.FeatureStore` show them like SAE features.

Input side: held-out text is streamed through the model, each kept token's MLP hidden activation is encoded on the
fitted features (nonnegative coefficients, :meth:`SNMF.activations`: coefficient × ‖z_i‖, the length of the part of
the hidden vector the feature accounts for), and the statistics and examples are those of ``saeforge harvest``
(top contexts, quantile samples, random non-firing contexts, top tokens). SNMF coefficients are rarely exactly 0, so
a token counts as firing for a feature where its activation is at least ``fire_threshold`` × the feature's largest
on the harvested text; the top examples do not depend on it, the densities do.

Output side: the feature's neuron pattern through the down projection and the unembedding (promoted and suppressed
tokens, :func:`saeforge.neurons.mlp.vocabulary_projection`). Neighbours are the nearest features by cosine of their
neuron patterns. A hierarchical fit adds its coarse features as a second dictionary, with ``parent`` links (weight:
the mixing coefficient) from each coarse feature to the fine features it feeds.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from saeforge.errors import SaeforgeError
from saeforge.features.store import STORE_FILE, WRITER_LOCK, FeatureStore, install_store
from saeforge.neurons.snmf import SNMF, encode
from saeforge.utils.atomic import TMP_PREFIX
from saeforge.utils.locking import exclusive_lock

COARSE_SUFFIX = ".coarse"


def features_hash(z: torch.Tensor) -> str:
    return hashlib.sha256(z.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def _neighbours(z: torch.Tensor, n: int) -> list[list]:
    unit = torch.nn.functional.normalize(z.float(), dim=1)
    sims = unit @ unit.T
    sims.fill_diagonal_(-2.0)
    n = min(n, z.shape[0] - 1)
    if n <= 0:
        return [[] for _ in range(z.shape[0])]
    top = sims.topk(n, dim=-1)
    return [[[int(i), float(v)] for i, v in zip(top.indices[r], top.values[r])] for r in range(z.shape[0])]


def write_feature_store(folder: str | Path, fit: SNMF, lm, *, site: str, corpus: str = "embedded:validation",
                        tokens: int = 32_768, context_length: int = 128, batch_size: int = 16,
                        fire_threshold: float = 0.1, top_examples: int = 20, n_logits: int = 10,
                        n_neighbors: int = 10, seed: int = 0, progress: bool = True, lock: bool = True) -> Path:
    """Fill ``folder``/features.sqlite with the fit's features (see the module docstring); returns its path. Written
    under a temporary name and put in place as ``harvest`` does, under the folder's writer lock (``lock=False``:
    the caller holds the folder's lock already)."""
    from saeforge.features.harvest import HarvestConfig
    from saeforge.neurons.mlp import mlp_site, vocabulary_projection

    if not 0 < fire_threshold < 1:
        raise SaeforgeError(f"fire threshold {fire_threshold} is not a fraction in (0, 1)",
                            "pass --fire-threshold 0.1 (a tenth of the feature's largest activation)")
    if tokens <= 0:
        raise SaeforgeError(f"--store-tokens {tokens} asks for no tokens", "pass a positive count, e.g. 32768")
    s = mlp_site(lm, site)
    if s.d != fit.d:
        raise SaeforgeError(f"the fit has {fit.d} neurons, {site} of this model has {s.d}",
                            "write the store with the model the SNMF was fitted on")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = HarvestConfig(path=str(folder), tokens=tokens, batch_size=batch_size, top_examples=top_examples,
                        n_logits=n_logits, n_neighbors=n_neighbors, seed=seed, corpus=corpus,
                        context_length=context_length)
    with exclusive_lock(folder, WRITER_LOCK) if lock else contextlib.nullcontext():
        return _write(folder, fit, lm, s, cfg, fire_threshold, progress, vocabulary_projection)


def _dictionaries(fit: SNMF, site: str) -> list[tuple[str, torch.Tensor]]:
    out = [(site, fit.features)]
    if fit.coarse is not None:
        out.append((site + COARSE_SUFFIX, fit.coarse))
    return out


def _write(folder: Path, fit: SNMF, lm, site, cfg, fire_threshold: float, progress: bool, vocab_projection) -> Path:
    from tqdm.auto import tqdm

    from saeforge.data.text_source import TextSource
    from saeforge.data.token_stream import TokenPolicy, TokenStream
    from saeforge.features.harvest import _feature_records

    T = cfg.context_length
    stream = TokenStream.for_model(TextSource(cfg.corpus, cfg.text_field), lm, TokenPolicy(T))
    n_target = max(1, -(-cfg.tokens // T))
    dictionaries = _dictionaries(fit, site.name)
    acts = {name: [] for name, _ in dictionaries}
    all_ids, all_kept, n_ctx, t0 = [], [], 0, time.time()
    bar = tqdm(total=n_target * T, unit="tok", unit_scale=True, desc="snmf store", disable=not progress,
               dynamic_ncols=True)
    for _, ids in stream.batches(cfg.batch_size):
        ids = ids[: n_target - n_ctx]
        keep = stream.keep_mask(ids)
        x = lm.read(ids, [site])[site.name][keep.to(lm.device)].float().cpu()
        for name, z in dictionaries:
            acts[name].append((encode(x, z) * z.norm(dim=1)).numpy())
        all_ids.append(ids.numpy().astype(np.int32))
        all_kept.append(keep.numpy())
        n_ctx += ids.shape[0]
        bar.update(ids.numel())
        if n_ctx >= n_target:
            break
    bar.close()
    if n_ctx == 0:
        raise SaeforgeError(f"the corpus {cfg.corpus!r} gave no tokens", "use a larger corpus")
    ids_all = np.concatenate(all_ids)
    ids_flat, kept_flat = ids_all.reshape(-1), np.concatenate(all_kept).reshape(-1)
    kept_index = np.nonzero(kept_flat)[0]  # global token index of each encoded row
    n_kept = int(kept_flat.sum())
    vocab = {int(i): lm.tokenizer.decode([int(i)]) for i in np.unique(ids_flat)}
    stream_seconds = time.time() - t0

    tmp = folder / f"{TMP_PREFIX}{STORE_FILE}"
    for leftover in (tmp, *(tmp.with_name(tmp.name + s) for s in ("-wal", "-shm", "-journal"))):
        leftover.unlink(missing_ok=True)
    store = FeatureStore(tmp, create=True)
    try:
        store.begin_bulk_load()
        store.add_contexts(ids_all, 0)
        store.add_vocab(vocab)
        rng = np.random.default_rng(cfg.seed)
        for name, z in dictionaries:
            a = np.concatenate(acts[name])  # [n_kept, k]
            logit_info = vocab_projection(lm, site.name, z, cfg.n_logits)
            neighbours = _neighbours(z, cfg.n_neighbors)
            sae_id = store.add_sae(name, site.name, int(z.shape[0]), "snmf", str(folder), features_hash(z))
            records, examples = [], []
            for i in tqdm(range(z.shape[0]), desc=f"features of {name}", disable=not progress, leave=False):
                col = a[:, i]
                top = float(col.max()) if len(col) else 0.0
                rows = np.nonzero(col >= fire_threshold * top)[0] if top > 0 else np.zeros(0, np.int64)
                rec, ex = _feature_records(cfg, rng, T, n_ctx, n_kept, kept_index[rows], col[rows], ids_flat,
                                           vocab, kept_flat)
                rec["idx"] = i
                rec["promoted"], rec["suppressed"] = logit_info[i]
                rec["neighbors"] = neighbours[i]
                records.append(rec)
                examples.extend((i, kind, rank, c, s, p, m, w) for rank, kind, c, s, p, m, w in ex)
            store.add_features(sae_id, records)
            store.add_examples(sae_id, examples)
        if fit.coarse is not None:  # coarse feature j → fine feature i, weighted by the mixing Y₂[i, j]
            mix = fit.mixing
            rows = [(j, i, float(mix[i, j])) for i in range(mix.shape[0]) for j in range(mix.shape[1])
                    if float(mix[i, j]) > 1e-3 * float(mix[i].max().clamp_min(1e-12))]
            store.add_links("parent", site.name + COARSE_SUFFIX, site.name, rows)
        for key, value in (("model", lm.name), ("corpus", cfg.corpus), ("context_length", T),
                           ("n_contexts", n_ctx), ("n_tokens", int(n_ctx * T)), ("n_kept_tokens", n_kept),
                           ("stream_tokens_per_s", n_ctx * T / max(stream_seconds, 1e-9)),
                           ("harvest_seconds", time.time() - t0), ("fire_threshold", fire_threshold),
                           ("kind", "snmf")):
            store.set_meta(key, value)
        store.end_bulk_load()
        store.close()
        install_store(tmp, folder / STORE_FILE)
    except BaseException:
        store.close()
        tmp.unlink(missing_ok=True)
        raise
    return folder / STORE_FILE
