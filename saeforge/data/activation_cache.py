"""ActivationCache: activations on disk, sharded and memory-mappable, written so that a kill never corrupts it.

Layout of a cache folder::

    manifest.json            # the source of truth: source, sites, dtype, shards, token count, norm statistics
    shards/00000/<site>.npy  # [tokens, d] per site (bfloat16 stored as its raw 16-bit pattern)
    shards/00000/tokens.npy  # [tokens] int32 token ids of those positions (caches of a model only)

Two sources write caches: ``saeforge cache`` runs a model over text (``"source": "model"``: the manifest names the
model, its fingerprint, the corpus and the token policy), and :meth:`ActivationCache.from_arrays` /
``saeforge import-activations`` copy activations the user already has (``"source": "arrays"``: no model, no token
ids, no token policy; see :mod:`saeforge.data.array_import`). Training reads both the same way.

A shard folder is built under a temporary name and renamed when complete; the manifest is rewritten atomically
after each shard. A shard that is on disk but not in the manifest (a kill between the two) is deleted and rebuilt on
resume, so nothing half-written is ever read as valid. One writer per folder: a second process writing the same
cache is refused (``saeforge.utils.locking``).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
from simple_parsing.helpers import field

from saeforge.data.activation_reader import read_activations
from saeforge.data.text_source import TextSource
from saeforge.data.token_stream import TokenPolicy, TokenStream
from saeforge.errors import SaeforgeError
from saeforge.options import ModelOptions, RuntimeOptions, TextOptions, flat_dict, flat_options
from saeforge.utils.atomic import atomic_directory, atomic_write_json, remove_stale_temporaries
from saeforge.utils.locking import LOCK_FILE, exclusive_lock
from saeforge.utils.threads import thread_policy

if TYPE_CHECKING:
    from saeforge.data.array_import import ArrayInput

FORMAT = "saeforge-activation-cache"
# 2: the manifest says its "source" ("model" or "arrays"); version-1 manifests are caches of a model.
FORMAT_VERSION = 2
NUMPY_STORAGE = {"float32": np.float32, "bfloat16": np.int16, "float16": np.float16}
TORCH_STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SOURCE_MODEL, SOURCE_ARRAYS = "model", "arrays"


@flat_options
@dataclass(frozen=True)
class CacheConfig:
    """Cache activations of a model at one or more sites to disk."""

    out: str = ""
    """Folder to write the cache to (created; re-running with the same arguments resumes)."""
    sites: tuple[str, ...] = ("layers.5.resid_post",)
    """Sites to read, e.g. layers.5.resid_post, layers.3.mlp_out, or raw module paths."""
    tokens: int = 100_000
    """How many activation vectors (kept token positions) to write."""
    model_options: ModelOptions = field(default_factory=ModelOptions)
    """The model (its dtype is also the dtype the activations are stored in)."""
    text_options: TextOptions = field(default_factory=TextOptions)
    """The text the activations are read on."""
    batch_size: int = 32
    """Contexts per forward pass."""
    shard_tokens: int = 65_536
    """Approximate tokens per shard file."""
    runtime_options: RuntimeOptions = field(default_factory=RuntimeOptions)
    """Where and how the model runs."""

    def token_policy(self) -> TokenPolicy:
        return self.text_options.token_policy()

    def validate(self) -> None:
        if not self.out:
            raise SaeforgeError("no output folder given", "pass --out DIR")
        if self.tokens <= 0:
            raise SaeforgeError(f"--tokens must be positive, got {self.tokens}", "pass e.g. --tokens 100000")
        if not self.sites:
            raise SaeforgeError("no sites given", "pass --sites layers.5.resid_post (one or more)")
        if self.model_dtype not in NUMPY_STORAGE:
            raise SaeforgeError(f"unknown dtype {self.model_dtype!r}", "pass --dtype float32 or --dtype bfloat16")
        if self.batch_size <= 0 or self.shard_tokens <= 0:
            raise SaeforgeError("batch_size and shard_tokens must be positive",
                                "pass e.g. --batch-size 32 --shard-tokens 65536")
        if self.threads < 0:
            raise SaeforgeError(f"--threads must be 0 (automatic) or positive, got {self.threads}",
                                "pass --threads 0")


# Options that must match for a resumed cache to be one consistent dataset (manifest key: config option).
_IDENTITY_FIELDS = {"sites": "sites", "corpus": "corpus", "text_field": "text_field",
                    "context_length": "context_length", "prepend_bos": "prepend_bos",
                    "exclude_special_tokens": "exclude_special_tokens", "dtype": "model_dtype"}


class ActivationCache:
    """Read side of a cache folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise SaeforgeError(f"{self.folder} is not an activation cache (no manifest.json)",
                                "create one with `saeforge cache --out DIR` (activations of a model) or "
                                "`saeforge import-activations --files FILE --out DIR` (your own arrays)")
        try:
            self.manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SaeforgeError(f"{path} is corrupt: {err}", "delete the folder and cache again") from err
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise SaeforgeError(f"{path} is not a saeforge activation cache manifest", "pass a cache folder")
        if self.manifest.get("version", 0) > FORMAT_VERSION:
            raise SaeforgeError(
                f"{path} has format version {self.manifest['version']}, newer than this saeforge reads "
                f"({FORMAT_VERSION})", "upgrade saeforge")

    @classmethod
    def from_arrays(cls, folder: str | Path, arrays: Mapping[str, ArrayInput], **options: Any) -> ActivationCache:
        """Write activations you already have as a cache: ``{site: array}`` with arrays ``[N, d]`` (numpy, torch,
        or the path of a .npy / .safetensors / .pt file), the same N for every site. Options: ``dtype``,
        ``shard_tokens``, ``progress``, ``threads`` (:func:`write_array_cache`)."""
        return write_array_cache(folder, arrays, **options)

    @property
    def source(self) -> str:
        """``"model"`` (``saeforge cache``) or ``"arrays"`` (imported user activations)."""
        return self.manifest.get("source", SOURCE_MODEL)

    def data_info(self) -> dict[str, Any]:
        """What the activations are, for run.json and the metadata of the SAEs trained on them: the model, its
        fingerprint and the token policy for a cache of a model; only where they come from for user arrays."""
        m = self.manifest
        if self.source == SOURCE_ARRAYS:
            return {"activation_source": SOURCE_ARRAYS, "dataset_path": str(self.folder)}
        return {"model_name": m["model"], "model_fingerprint": m["model_fingerprint"],
                "context_size": m["context_length"], "prepend_bos": m["prepend_bos"],
                "exclude_special_tokens": m["exclude_special_tokens"], "dataset_path": m["corpus"]}

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
        return TORCH_STORAGE[self.manifest["dtype"]]

    def _check_site(self, site: str) -> None:
        if site not in self.manifest["sites"]:
            raise SaeforgeError(f"site {site!r} is not in the cache {self.folder}",
                                f"pass --sites with sites the cache holds: --sites {' '.join(self.sites)}")

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
        if self.source == SOURCE_ARRAYS:
            raise SaeforgeError(f"the cache {self.folder} holds imported arrays, which have no token ids",
                                "use a cache written by `saeforge cache` for anything that needs the tokens")
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
    d = flat_dict(cfg)
    return {key: d[option] for key, option in _IDENTITY_FIELDS.items()}


def _new_manifest(cfg: CacheConfig, lm, sites) -> dict:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "source": SOURCE_MODEL,
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
    if manifest.get("source") == SOURCE_ARRAYS:
        raise SaeforgeError(f"{folder} holds imported arrays, not activations of a model",
                            "pass another --out folder to `saeforge cache`")
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


def _write_shard(shards_dir: Path, entry: dict, acts: dict[str, torch.Tensor], dtype: str,
                 tokens: torch.Tensor | None = None) -> dict:
    """Write one shard folder atomically (``acts`` already in the storage ``dtype``); fill ``entry``'s token count and
    norm sums and return it."""
    entry.update(tokens=int(next(iter(acts.values())).shape[0]), norm_sum={}, sq_norm_sum={})
    with atomic_directory(shards_dir / entry["name"]) as tmp:
        for site, act in acts.items():
            norms = act.float().norm(dim=-1).double()
            entry["norm_sum"][site] = float(norms.sum())
            entry["sq_norm_sum"][site] = float(norms.square().sum())
            arr = act.cpu().contiguous()
            arr = arr.view(torch.int16).numpy() if dtype == "bfloat16" else arr.numpy().astype(NUMPY_STORAGE[dtype],
                                                                                             copy=False)
            np.save(tmp / f"{site}.npy", arr)
        if tokens is not None:
            np.save(tmp / "tokens.npy", tokens.numpy().astype(np.int32))
    return entry


def _append_shard(manifest: dict, manifest_path: Path, entry: dict) -> None:
    manifest["shards"].append(entry)
    manifest["token_count"] += entry["tokens"]
    manifest["complete"] = manifest["token_count"] >= manifest["target_tokens"]
    _update_norm_stats(manifest)
    atomic_write_json(manifest_path, manifest)


def _open_to_extend(cfg: CacheConfig, lm, sites, folder: Path) -> tuple[dict, Path, Path]:
    """(manifest, its path, the shards folder) of the cache in ``folder``, ready to grow to ``cfg.tokens``: an existing
    one checked for resume (a new one made), the folder prepared, and a last shard that was cut to an older, smaller
    target dropped so it is rebuilt whole (an extended cache then equals one long run)."""
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        manifest = ActivationCache(folder).manifest
        _check_resumable(manifest, cfg, lm, folder)
    else:
        manifest = _new_manifest(cfg, lm, sites)
    manifest["target_tokens"] = cfg.tokens
    shards_dir = _prepare_folder(folder, manifest, manifest_path)
    last = manifest["shards"][-1] if manifest["shards"] else None
    if last is not None and last.get("truncated") and manifest["token_count"] < cfg.tokens:
        manifest["shards"].pop()
        manifest["token_count"] -= last["tokens"]
        _update_norm_stats(manifest)
        atomic_write_json(manifest_path, manifest)
        shutil.rmtree(shards_dir / last["name"], ignore_errors=True)
    return manifest, manifest_path, shards_dir


def _prepare_folder(folder: Path, manifest: dict, manifest_path: Path) -> Path:
    """Remove what a killed writer left (temporaries, shards renamed into place but never recorded); return the
    shards folder."""
    shards_dir = folder / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(shards_dir)
    known = {s["name"] for s in manifest["shards"]}
    for child in shards_dir.iterdir():
        if child.name not in known:
            shutil.rmtree(child, ignore_errors=True)
    return shards_dir


def _refuse_foreign_folder(folder: Path, flag: str = "--out") -> None:
    if folder.exists() and not folder.is_dir():
        raise SaeforgeError(f"{flag} {folder} is a file", f"pass a folder path to {flag}")
    if folder.is_dir() and not (folder / "manifest.json").is_file() and any(
            p for p in folder.iterdir() if not p.name.startswith(".tmp-") and p.name != LOCK_FILE):
        raise SaeforgeError(f"{flag} {folder} exists and is not an activation cache",
                            f"pass an empty or new folder to {flag}")


def build_cache(cfg: CacheConfig, lm=None, progress: bool | None = None) -> ActivationCache:
    """Write (or resume) a cache. ``lm`` may be passed to reuse a loaded model; ``progress`` None: ``cfg.progress``.

    The folder is locked for the whole run: a second writer on it is refused at once. Under torchrun the ranks
    share the work (:mod:`saeforge.distributed.caching`)."""
    from saeforge.distributed.process_group import launched_by_torchrun

    if launched_by_torchrun():
        from saeforge.distributed.caching import build_cache_distributed

        return build_cache_distributed(cfg, progress)
    cfg.validate()
    TextSource(cfg.corpus, cfg.text_field).check()
    if lm is None:
        from saeforge.models.sites import check_sites_before_loading

        check_sites_before_loading(cfg.model, cfg.sites)
    folder = Path(cfg.out)
    _refuse_foreign_folder(folder)
    with exclusive_lock(folder, "saeforge cache"), thread_policy(cfg.threads):
        return _build_cache(cfg, folder, lm, cfg.progress if progress is None else progress)


def _build_cache(cfg: CacheConfig, folder: Path, lm, progress: bool) -> ActivationCache:
    from tqdm.auto import tqdm

    from saeforge.models.language_model import LanguageModel

    if lm is None:
        lm = LanguageModel.load(cfg.model, dtype=cfg.model_dtype, device=cfg.device)
    sites = [lm.site(s) for s in cfg.sites]
    token_stream = TokenStream.for_model(TextSource(cfg.corpus, cfg.text_field), lm, cfg.token_policy())

    manifest, manifest_path, shards_dir = _open_to_extend(cfg, lm, sites, folder)
    target = cfg.tokens
    done = manifest["token_count"]
    if done >= target:
        manifest["complete"] = True
        atomic_write_json(manifest_path, manifest)
        return ActivationCache(folder)

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
        tokens = torch.cat(pending_tokens)
        entry = {"name": f"{len(manifest['shards']):05d}", "context_start": shard_ctx_start,
                 "context_end": context_end, "truncated": bool(tokens.shape[0] > need)}
        acts = {site: torch.cat(parts)[:need] for site, parts in pending.items()}
        _append_shard(manifest, manifest_path, _write_shard(shards_dir, entry, acts, cfg.model_dtype, tokens[:need]))
        for parts in pending.values():
            parts.clear()
        pending_tokens = []
        n_pending = 0
        shard_ctx_start = context_end

    atomic_write_json(manifest_path, manifest)
    ctx_end = start_ctx
    try:
        for first, input_ids in token_stream.batches(cfg.batch_size, start=start_ctx):
            batch = read_activations(lm, token_stream, input_ids, sites, dtype=lm.dtype)
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


# ------------------------------------------------------------------------------------------------------------------
# Caches of user arrays


def write_array_cache(out: str | Path, arrays: Mapping[str, ArrayInput], *, dtype: str = "",
                      shard_tokens: int = 65_536, progress: bool = True, threads: int = 0) -> ActivationCache:
    """Copy ``{site: [N, d] array}`` into a cache at ``out``, a shard at a time (memory: one shard), so inputs larger
    than RAM work when they are memory-mapped (.npy files, .safetensors, torch .pt saved by ``torch.save``).

    Every input is checked before anything is written (2-D, floating point, one N for all sites, files readable);
    NaN/Inf rows are found while copying and stop it with the row's index, leaving no cache behind. ``dtype``:
    the storage dtype (float32, bfloat16, float16); empty: bfloat16/float16 inputs keep theirs, others become
    float32. Re-running the same import after a kill resumes it; a finished one returns at once.
    """
    from saeforge.data.array_import import open_arrays

    if dtype and dtype not in NUMPY_STORAGE:
        raise SaeforgeError(f"unknown storage dtype {dtype!r}", "pass --dtype float32, bfloat16 or float16")
    if shard_tokens <= 0:
        raise SaeforgeError(f"shard_tokens must be positive, got {shard_tokens}", "pass e.g. --shard-tokens 65536")
    sources = open_arrays(arrays)
    n_rows = next(iter(sources.values())).shape[0]
    if not dtype:
        dtypes = {a.dtype for a in sources.values()}
        dtype = dtypes.pop() if len(dtypes) == 1 and dtypes <= {"bfloat16", "float16"} else "float32"
    folder = Path(out)
    _refuse_foreign_folder(folder)
    identity = {"sites": {name: {"d": a.shape[1], "from": a.origin} for name, a in sources.items()},
                "dtype": dtype, "target_tokens": n_rows, "shard_tokens": shard_tokens}
    with exclusive_lock(folder, "saeforge import-activations"), thread_policy(threads):
        manifest_path = folder / "manifest.json"
        created = not manifest_path.is_file()
        if created:
            manifest = {"format": FORMAT, "version": FORMAT_VERSION, "source": SOURCE_ARRAYS, **identity,
                        "token_count": 0, "complete": False, "shards": [], "mean_norm": {}, "mean_sq_norm": {},
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        else:
            manifest = ActivationCache(folder).manifest
            have = {k: manifest.get(k) for k in identity}
            if manifest.get("source") != SOURCE_ARRAYS or have != identity:
                raise SaeforgeError(f"{folder} already holds another cache ({have} , asked for {identity})",
                                    "pass another --out folder, or delete this one to replace it")
        shards_dir = _prepare_folder(folder, manifest, manifest_path)
        atomic_write_json(manifest_path, manifest)
        try:
            _copy_arrays(sources, manifest, manifest_path, shards_dir, dtype, shard_tokens, progress)
        except _BadRows:
            if created:  # bad data: leave nothing that looks like a cache
                for child in folder.iterdir():
                    if child.name != LOCK_FILE:
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
            raise
    return ActivationCache(folder)


class _BadRows(SaeforgeError):
    """Input rows that are not finite (in the storage dtype)."""


def _finite(name: str, source, acts: torch.Tensor, start: int, dtype: str) -> None:
    bad = ~torch.isfinite(acts).all(dim=1)
    if bool(bad.any()):
        rows = (bad.nonzero().squeeze(1) + start).tolist()
        more = f" and {len(rows) - 5} more in this block" if len(rows) > 5 else ""
        raise _BadRows(f"site {name!r} ({source.origin}): row(s) {', '.join(map(str, rows[:5]))}{more} hold NaN or "
                       f"Inf (or values too large for {dtype})",
                       "drop those rows from every site's array (numpy: keep = np.isfinite(a).all(1); a = a[keep]) "
                       "and import again")


def _copy_arrays(sources, manifest: dict, manifest_path: Path, shards_dir: Path, dtype: str, shard_tokens: int,
                 progress: bool) -> None:
    from tqdm.auto import tqdm

    n_rows = manifest["target_tokens"]
    bar = tqdm(total=n_rows, initial=manifest["token_count"], unit="row", unit_scale=True, desc="importing",
               disable=not progress, dynamic_ncols=True)
    try:
        while manifest["token_count"] < n_rows:
            start = manifest["token_count"]
            stop = min(start + shard_tokens, n_rows)
            acts = {name: a.rows(start, stop).to(TORCH_STORAGE[dtype]) for name, a in sources.items()}
            for name, act in acts.items():
                _finite(name, sources[name], act, start, dtype)
            entry = {"name": f"{len(manifest['shards']):05d}", "row_start": start}
            _append_shard(manifest, manifest_path, _write_shard(shards_dir, entry, acts, dtype))
            bar.update(stop - start)
    finally:
        bar.close()
