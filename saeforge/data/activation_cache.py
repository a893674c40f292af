"""ActivationCache: activations on disk, sharded and memory-mappable, written so that a kill never corrupts it.

Layout of a cache folder::

    manifest.json            # the source of truth: config, sites, dtype, shards, token count, norm statistics
    shards/00000/<site>.npy  # [tokens, d] per site (bfloat16 stored as its raw 16-bit pattern)
    shards/00000/tokens.npy  # [tokens] int32 token ids of those positions

A shard folder is built under a temporary name and renamed when complete; the manifest is rewritten atomically
after each shard. A shard that is on disk but not in the manifest (a kill between the two) is deleted and rebuilt on
resume, so nothing half-written is ever read as valid.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from saeforge.data.activation_reader import read_activations
from saeforge.data.text_source import TextSource
from saeforge.data.token_stream import TokenPolicy, TokenStream
from saeforge.errors import SaeforgeError
from saeforge.utils.atomic import atomic_directory, atomic_write_json, remove_stale_temporaries

FORMAT = "saeforge-activation-cache"
FORMAT_VERSION = 1
NUMPY_STORAGE = {"float32": np.float32, "bfloat16": np.int16, "float16": np.float16}


@dataclass(frozen=True)
class CacheConfig:
    """Cache activations of a model at one or more sites to disk."""

    out: str = ""
    """Folder to write the cache to (created; re-running with the same arguments resumes)."""
    model: str = "embedded"
    """Model: `embedded` (SmolLM2-135M-Instruct), a hub id, a local Hugging Face folder or a .gguf file."""
    sites: tuple[str, ...] = ("layers.5.resid_post",)
    """Sites to read, e.g. layers.5.resid_post, layers.3.mlp_out, or raw module paths."""
    tokens: int = 100_000
    """How many activation vectors (kept token positions) to write."""
    corpus: str = "embedded:train"
    """Text: embedded[:train|validation|all], a .txt file, a folder of .txt files, a .jsonl file, or hf:NAME[:SPLIT]."""
    text_field: str = "text"
    """Field holding the text in .jsonl files and hf: datasets."""
    context_length: int = 128
    """Tokens per context (BOS included)."""
    prepend_bos: bool = True
    """Start every context with BOS."""
    exclude_special_tokens: bool = True
    """Leave BOS/EOS/padding positions out of the cache (their norms are outliers)."""
    dtype: str = "float32"
    """Model and storage dtype: float32 or bfloat16."""
    batch_size: int = 32
    """Contexts per forward pass."""
    shard_tokens: int = 65_536
    """Approximate tokens per shard file."""
    device: str = "auto"
    """auto, cpu or cuda."""

    def token_policy(self) -> TokenPolicy:
        return TokenPolicy(self.context_length, self.prepend_bos, self.exclude_special_tokens)

    def validate(self) -> None:
        if not self.out:
            raise SaeforgeError("no output folder given", "pass --out DIR")
        if self.tokens <= 0:
            raise SaeforgeError(f"--tokens must be positive, got {self.tokens}", "pass e.g. --tokens 100000")
        if not self.sites:
            raise SaeforgeError("no sites given", "pass --sites layers.5.resid_post (one or more)")
        if self.dtype not in NUMPY_STORAGE:
            raise SaeforgeError(f"unknown dtype {self.dtype!r}", f"use one of {', '.join(NUMPY_STORAGE)}")
        if self.batch_size <= 0 or self.shard_tokens <= 0:
            raise SaeforgeError("batch_size and shard_tokens must be positive", "pass positive values")


# Fields that must match for a resumed cache to be one consistent dataset.
_IDENTITY_FIELDS = ("sites", "corpus", "text_field", "context_length", "prepend_bos", "exclude_special_tokens", "dtype")


class ActivationCache:
    """Read side of a cache folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise SaeforgeError(f"{self.folder} is not an activation cache (no manifest.json)",
                                "create one with `saeforge cache --out DIR`")
        import json

        try:
            self.manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SaeforgeError(f"{path} is corrupt: {err}", "delete the folder and cache again") from err
        if self.manifest.get("format") != FORMAT:
            raise SaeforgeError(f"{path} is not a saeforge activation cache manifest", "point at a cache folder")
        if self.manifest.get("version", 0) > FORMAT_VERSION:
            raise SaeforgeError(
                f"{path} has format version {self.manifest['version']}, newer than this saeforge reads "
                f"({FORMAT_VERSION})", "upgrade saeforge")

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    def d(self, site: str) -> int:
        return int(self.manifest["sites"][site]["d"])

    @property
    def token_count(self) -> int:
        return int(self.manifest["token_count"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.manifest["dtype"]]

    def _check_site(self, site: str) -> None:
        if site not in self.manifest["sites"]:
            raise SaeforgeError(f"site {site!r} is not in the cache {self.folder}",
                                f"the cache holds: {', '.join(self.sites)}")

    def shard_array(self, index: int, site: str) -> np.ndarray:
        """Memory-mapped ``[tokens, d]`` array of one shard (raw storage dtype)."""
        self._check_site(site)
        shard = self.shards[index]
        path = self.folder / "shards" / shard["name"] / f"{site}.npy"
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise SaeforgeError(f"shard file {path} is missing or corrupt: {err}",
                                "delete the cache folder and cache again") from err
        if arr.shape != (shard["tokens"], self.d(site)):
            raise SaeforgeError(f"shard file {path} has shape {arr.shape}, the manifest says "
                                f"{(shard['tokens'], self.d(site))}", "delete the cache folder and cache again")
        return arr

    def shard_tensor(self, index: int, site: str) -> torch.Tensor:
        """One shard as a tensor in the cache dtype (a copy; shards are small)."""
        t = torch.from_numpy(np.array(self.shard_array(index, site)))
        return t.view(torch.bfloat16) if self.manifest["dtype"] == "bfloat16" else t

    def shard_tokens(self, index: int) -> np.ndarray:
        return np.load(self.folder / "shards" / self.shards[index]["name"] / "tokens.npy", mmap_mode="r")

    def load(self, site: str, max_tokens: int | None = None) -> torch.Tensor:
        """Concatenate shards (in order) into one tensor: for small caches, tests and benchmarks."""
        parts, n = [], 0
        for i in range(len(self.shards)):
            if max_tokens is not None and n >= max_tokens:
                break
            parts.append(self.shard_tensor(i, site))
            n += parts[-1].shape[0]
        out = torch.cat(parts) if parts else torch.empty(0, self.d(site))
        return out[:max_tokens] if max_tokens is not None else out


def _cache_identity(cfg: CacheConfig) -> dict:
    d = asdict(cfg)
    return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in _IDENTITY_FIELDS}


def _new_manifest(cfg: CacheConfig, lm, sites) -> dict:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": cfg.model,
        "model_type": lm.model_type,
        "model_fingerprint": lm.fingerprint(),
        **_cache_identity(cfg),
        "sites": {s.name: {"d": s.d, "module": s.module_path} for s in sites},
        "target_tokens": cfg.tokens,
        "token_count": 0,
        "complete": False,
        "shards": [],
        "mean_norm": {},
        "mean_sq_norm": {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _check_resumable(manifest: dict, cfg: CacheConfig, lm, folder: Path) -> None:
    if manifest.get("model_fingerprint") != lm.fingerprint():
        raise SaeforgeError(
            f"{folder} holds activations of a different model ({manifest.get('model')}, "
            f"fingerprint {manifest.get('model_fingerprint')}), not of {cfg.model}",
            "choose another --out folder, or delete this one to replace it")
    want = _cache_identity(cfg)
    want["sites"] = {s: None for s in want["sites"]}
    have = {k: manifest.get(k) for k in _IDENTITY_FIELDS}
    have["sites"] = {s: None for s in manifest.get("sites", {})}
    diffs = [f"{k}: cache has {have[k]!r}, asked for {want[k]!r}" for k in _IDENTITY_FIELDS if have[k] != want[k]]
    if diffs:
        raise SaeforgeError(f"{folder} holds a cache made with other settings: " + "; ".join(diffs),
                            "re-run with the cache's settings to resume, or choose another --out folder")


def _update_norm_stats(manifest: dict) -> None:
    total = max(manifest["token_count"], 1)
    for site in manifest["sites"]:
        manifest["mean_norm"][site] = sum(s["norm_sum"][site] for s in manifest["shards"]) / total
        manifest["mean_sq_norm"][site] = sum(s["sq_norm_sum"][site] for s in manifest["shards"]) / total


def build_cache(cfg: CacheConfig, lm=None, progress: bool = True) -> ActivationCache:
    """Write (or resume) a cache. ``lm`` may be passed to reuse a loaded model."""
    from tqdm.auto import tqdm

    from saeforge.models.language_model import LanguageModel

    cfg.validate()
    folder = Path(cfg.out)
    if folder.exists() and not folder.is_dir():
        raise SaeforgeError(f"--out {folder} is a file", "pass a folder path")
    if lm is None:
        lm = LanguageModel.load(cfg.model, dtype=cfg.dtype, device=cfg.device)
    sites = [lm.site(s) for s in cfg.sites]
    token_stream = TokenStream.for_model(TextSource(cfg.corpus, cfg.text_field), lm, cfg.token_policy())

    shards_dir = folder / "shards"
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        manifest = ActivationCache(folder).manifest
        _check_resumable(manifest, cfg, lm, folder)
    else:
        if folder.is_dir() and any(p for p in folder.iterdir() if not p.name.startswith(".tmp-")):
            raise SaeforgeError(f"--out {folder} exists and is not an activation cache",
                                "choose an empty or new folder")
        manifest = _new_manifest(cfg, lm, sites)
    manifest["target_tokens"] = cfg.tokens
    shards_dir.mkdir(parents=True, exist_ok=True)
    # Leftovers of a killed run: temporaries, and shards renamed into place but never recorded in the manifest.
    remove_stale_temporaries(shards_dir)
    known = {s["name"] for s in manifest["shards"]}
    for child in shards_dir.iterdir():
        if child.name not in known:
            shutil.rmtree(child, ignore_errors=True)

    target = cfg.tokens
    last = manifest["shards"][-1] if manifest["shards"] else None
    if last is not None and last.get("truncated") and manifest["token_count"] < target:
        # The last shard was cut to hit the old target; rebuild it whole so an extended cache equals one long run.
        manifest["shards"].pop()
        manifest["token_count"] -= last["tokens"]
        _update_norm_stats(manifest)
        atomic_write_json(manifest_path, manifest)
        shutil.rmtree(shards_dir / last["name"], ignore_errors=True)
    done = manifest["token_count"]
    if done >= target:
        manifest["complete"] = True
        atomic_write_json(manifest_path, manifest)
        return ActivationCache(folder)

    storage = NUMPY_STORAGE[cfg.dtype]
    torch_dtype = lm.dtype
    start_ctx = manifest["shards"][-1]["context_end"] if manifest["shards"] else 0
    bar = tqdm(total=target, initial=done, unit="tok", unit_scale=True, desc="caching", disable=not progress,
               dynamic_ncols=True)

    pending: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    pending_tokens: list[torch.Tensor] = []
    n_pending = 0
    shard_ctx_start = start_ctx

    def flush(context_end: int) -> None:
        nonlocal n_pending, shard_ctx_start, pending_tokens
        need = target - manifest["token_count"]
        name = f"{len(manifest['shards']):05d}"
        tokens = torch.cat(pending_tokens)
        truncated = tokens.shape[0] > need
        tokens = tokens[:need]
        entry = {"name": name, "tokens": int(tokens.shape[0]), "context_start": shard_ctx_start,
                 "context_end": context_end, "truncated": bool(truncated), "norm_sum": {}, "sq_norm_sum": {}}
        with atomic_directory(shards_dir / name) as tmp:
            for site_name, parts in pending.items():
                acts = torch.cat(parts)[:need]
                norms = acts.float().norm(dim=-1)
                entry["norm_sum"][site_name] = float(norms.double().sum())
                entry["sq_norm_sum"][site_name] = float(norms.double().square().sum())
                arr = acts.cpu().contiguous()
                arr = arr.view(torch.int16).numpy() if cfg.dtype == "bfloat16" else arr.numpy().astype(storage,
                                                                                                   copy=False)
                np.save(tmp / f"{site_name}.npy", arr)
            np.save(tmp / "tokens.npy", tokens.numpy().astype(np.int32))
        manifest["shards"].append(entry)
        manifest["token_count"] += entry["tokens"]
        manifest["complete"] = manifest["token_count"] >= target
        _update_norm_stats(manifest)
        atomic_write_json(manifest_path, manifest)
        for parts in pending.values():
            parts.clear()
        pending_tokens = []
        n_pending = 0
        shard_ctx_start = context_end

    atomic_write_json(manifest_path, manifest)
    ctx_end = start_ctx
    try:
        for first, input_ids in token_stream.batches(cfg.batch_size, start=start_ctx):
            batch = read_activations(lm, token_stream, input_ids, sites, dtype=torch_dtype)
            for name, act in batch.acts.items():
                pending[name].append(act)
            pending_tokens.append(batch.tokens)
            n_pending += batch.n_tokens
            ctx_end = first + batch.n_contexts
            bar.update(min(batch.n_tokens, target - bar.n))
            if n_pending >= cfg.shard_tokens or manifest["token_count"] + n_pending >= target:
                flush(ctx_end)
                if manifest["complete"]:
                    break
        if n_pending and not manifest["complete"]:
            flush(ctx_end)
    finally:
        bar.close()
    if not manifest["complete"]:
        raise SaeforgeError(
            f"the corpus {cfg.corpus!r} ran out after {manifest['token_count']} of the {target} tokens asked for",
            f"ask for at most {manifest['token_count']} tokens (what is cached is kept), or use a larger corpus")
    return ActivationCache(folder)
