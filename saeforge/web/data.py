"""What the dashboard shows, as plain dicts: a run's overview, feature lists, feature pages, prompt inspection and
the steering playground.

Nothing here knows about HTTP; :mod:`saeforge.web.app` turns these dicts into JSON responses and HTML pages. Every
read goes through :class:`~saeforge.features.store.FeatureStore` (one read-only connection per server thread) and
the files a run already has (``run.json``, ``eval.json``, ``saes/<name>/plots/*.png``).
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np

from saeforge.errors import SaeforgeError
from saeforge.features.store import SCHEMA_VERSION, STORE_FILE, FeatureStore

# The eval.json metrics shown first on the overview, with their labels (everything else is under "all metrics").
KEY_METRICS = (
    ("fvu", "FVU (unexplained variance)"),
    ("explained_variance", "explained variance"),
    ("l0", "L0 (active latents per token)"),
    ("dead_fraction", "dead latents"),
    ("ce_recovered", "CE loss recovered"),
    ("ce_loss_clean", "CE loss, clean"),
    ("ce_loss_sae", "CE loss, SAE spliced in"),
    ("kl_div", "KL divergence"),
    ("cosine_similarity", "cosine similarity"),
    ("n_tokens", "tokens evaluated"),
)
ORDERS = ("density", "index", "score", "max_act")
MAX_LIST_LIMIT = 500
# The steering playground's limits: one request generates len(prompts) × max_new_tokens tokens twice (baseline and
# steered) on the server's one model, and holds every other model request until it is done.
MAX_STEER_PROMPTS = 8
MAX_STEER_EDITS = 8
MAX_STEER_NEW_TOKENS = 128
MAX_STEER_TEMPERATURE = 5.0
MAX_STEER_SEED = 2**32 - 1


class WebError(Exception):
    """A request the dashboard cannot answer: an HTTP status, the problem and (optionally) what to do about it."""

    def __init__(self, status: int, problem: str, fix: str | None = None):
        super().__init__(problem)
        self.status, self.problem, self.fix = status, problem, fix

    def payload(self) -> dict:
        return {"error": self.problem, "fix": self.fix, "status": self.status}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return {"_unreadable": f"{path.name} could not be read: {err}"}


def check_store_schema(path: Path) -> None:
    """Refuse (or migrate) a store written by another schema version before the dashboard reads it.

    A store from an older saeforge is opened writable once, which runs the store's own migration; when no
    migration exists the store refuses with a message saying to harvest again. A newer store is refused."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        finally:
            con.close()
        version = int(json.loads(row[0])) if row else 0
    except (sqlite3.DatabaseError, ValueError, TypeError) as err:
        raise SaeforgeError(f"{path} is not a readable feature store ({err})",
                            "harvest again: saeforge harvest RUN_DIR") from err
    if version < SCHEMA_VERSION:
        FeatureStore(path).close()  # migrates, or raises SaeforgeError with its message
    # newer versions: FeatureStore(readonly=True) raises with the right message
    FeatureStore(path, readonly=True).close()


class RunData:
    """A run directory as the dashboard sees it. Thread-safe: each thread gets its own read-only store."""

    def __init__(self, run_dir: str | Path, *, model: str = "", device: str = "auto", max_prompt_chars: int = 20_000):
        from saeforge.runs import find_saes

        self.path = Path(run_dir).resolve()
        if not self.path.is_dir():
            raise SaeforgeError(f"{run_dir} is not a directory", "pass a run directory: saeforge serve RUN_DIR")
        try:
            self.sae_folders = find_saes(self.path)
        except SaeforgeError:
            self.sae_folders = {}
        self.store_path = self.path / STORE_FILE
        if self.store_path.is_file():
            check_store_schema(self.store_path)
        elif not self.sae_folders and not (self.path / "eval.json").is_file():
            raise SaeforgeError(f"{run_dir} holds no run: no saes/, eval.json or {STORE_FILE}",
                                "pass a run directory from `saeforge train` (then eval and harvest it)")
        self.model, self.device, self.max_prompt_chars = model, device, max_prompt_chars
        self._stores: dict[int, FeatureStore] = {}  # thread id -> its connection
        self._lock = threading.Lock()
        # One language model for the prompt inspector and the steering playground, loaded on the first request that
        # needs it. The lock serialises every use: steering hooks the model, so nothing else may run through it then.
        self._inspector = None
        self._steerer = None
        self._model_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------- store
    @property
    def has_store(self) -> bool:
        return self.store_path.is_file()

    def store(self) -> FeatureStore:
        """This thread's read-only connection to the store (opened on first use)."""
        key = threading.get_ident()
        store = self._stores.get(key)
        if store is None:
            if not self.has_store:
                raise WebError(404, f"this run has no feature store ({STORE_FILE})",
                               f"run `saeforge harvest {self.path}` to fill it")
            store = FeatureStore(self.store_path, readonly=True)
            with self._lock:
                self._stores[key] = store
        return store

    def close(self) -> None:
        """Close every thread's connection (the server is stopping); a later request opens a new one."""
        with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for s in stores:
            try:
                s.close()
            except sqlite3.Error:  # pragma: no cover
                pass

    def sae_info(self, sae: str) -> dict:
        for s in self.store().saes():
            if s["name"] == sae:
                return s
        names = ", ".join(s["name"] for s in self.store().saes())
        raise WebError(404, f"no SAE named {sae!r} in this run", f"the feature store holds: {names}")

    def default_sae(self) -> str | None:
        if self.has_store:
            saes = self.store().saes()
            if saes:
                return saes[0]["name"]
        return next(iter(self.sae_folders), None)

    # ------------------------------------------------------------------------------------------------- overview
    def plots(self, sae: str) -> list[str]:
        folder = self.sae_folders.get(sae)
        if folder is None or not (folder / "plots").is_dir():
            return []
        return sorted(p.name for p in (folder / "plots").glob("*.png"))

    def plot_file(self, sae: str, name: str) -> Path:
        if name not in self.plots(sae):
            raise WebError(404, f"no plot {name!r} for SAE {sae!r}")
        return self.sae_folders[sae] / "plots" / name

    def overview(self) -> dict:
        run = _read_json(self.path / "run.json") or {}
        cfg = run.get("config", {}) if isinstance(run.get("config"), dict) else {}
        ev = _read_json(self.path / "eval.json")
        eval_saes = (ev or {}).get("saes", {}) if isinstance(ev, dict) else {}
        store_meta, store_saes, explained = None, {}, {}
        if self.has_store:
            st = self.store()
            store_meta = st.all_meta()
            store_saes = {s["name"]: s for s in st.saes()}
            explained = {n: _count_explained(st, s["id"]) for n, s in store_saes.items()}
        names = list(dict.fromkeys([*self.sae_folders, *eval_saes, *store_saes]))
        saes = []
        for name in names:
            metrics = eval_saes.get(name)
            info = store_saes.get(name, {})
            scalars = {k: v for k, v in (metrics or {}).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            saes.append({
                "name": name,
                "site": info.get("site") or (metrics or {}).get("site") or name,
                "architecture": info.get("architecture") or (metrics or {}).get("architecture"),
                "d_sae": info.get("d_sae") or (metrics or {}).get("d_sae"),
                "in_store": name in store_saes,
                "n_explained": explained.get(name, 0),
                "key_metrics": [{"key": k, "label": label, "value": scalars[k]} for k, label in KEY_METRICS
                                if k in scalars],
                "metrics": scalars,
                "plots": [f"/plots/{name}/{p}" for p in self.plots(name)],
                "plots_note": (metrics or {}).get("plots") if isinstance((metrics or {}).get("plots"), str) else None,
            })
        eval_info = None
        if isinstance(ev, dict):
            eval_info = {k: ev.get(k) for k in ("created", "model", "corpus", "context_length", "n_token_positions",
                                                 "seconds", "warning", "_unreadable") if ev.get(k) is not None}
        return {
            "run": {"path": str(self.path), "name": self.path.name, "run_id": run.get("run_id"),
                    "model": cfg.get("model"), "sites": cfg.get("sites"), "architecture": cfg.get("architecture"),
                    "training_tokens": cfg.get("tokens"), "corpus": cfg.get("corpus"),
                    "d_sae": cfg.get("d_sae"), "expansion_factor": cfg.get("expansion_factor"), "k": cfg.get("k")},
            "eval": eval_info,
            "store": store_meta,
            "saes": saes,
        }

    # ------------------------------------------------------------------------------------------------- features
    def feature_list(self, sae: str, *, q: str = "", token: str = "", order: str = "density", offset: int = 0,
                     limit: int = 50) -> dict:
        info = self.sae_info(sae)
        if order not in ORDERS:
            raise WebError(400, f"unknown order {order!r}", f"use one of {', '.join(ORDERS)}")
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise WebError(400, f"limit {limit} is out of range", f"use 1..{MAX_LIST_LIMIT}")
        if offset < 0:
            raise WebError(400, f"offset {offset} is negative")
        rows = self.store().list_features(sae, order=order, offset=offset, limit=limit + 1, query=q.strip(),
                                          token=token)
        return {"sae": sae, "d_sae": info["d_sae"], "q": q, "token": token, "order": order, "offset": offset,
                "limit": limit, "features": rows[:limit], "has_more": len(rows) > limit}

    def feature(self, sae: str, idx: int) -> dict:
        info = self.sae_info(sae)
        st = self.store()
        if not 0 <= idx < info["d_sae"]:
            raise WebError(404, f"feature {idx} is out of range: SAE {sae!r} has features 0..{info['d_sae'] - 1}",
                           f"pick an index below {info['d_sae']}")
        try:
            rec = st.feature(sae, idx, with_examples=False)
        except SaeforgeError as err:
            raise WebError(404, err.problem, err.fix) from err
        rec["examples"] = _examples(st, info["id"], idx)
        rec.pop("sae_id", None)
        rec["d_sae"] = info["d_sae"]
        rec["site"] = info["site"]
        neighbors = rec.get("neighbors") or []
        others = _brief_features(st, info["id"], [int(i) for i, _ in neighbors])
        rec["neighbors"] = [{"idx": int(i), "cosine": float(c), **others.get(int(i), {})} for i, c in neighbors]
        return rec

    # ------------------------------------------------------------------------------------------------- inspector
    @property
    def inspector_loaded(self) -> bool:
        return self._inspector is not None or self._steerer is not None  # either way the model is in memory

    def max_prompt_tokens(self) -> int:
        from saeforge.features.inspect import MAX_PROMPT_TOKENS

        return self._inspector.max_tokens if self._inspector is not None else MAX_PROMPT_TOKENS

    def _load_inspector(self):
        """The inspector (loaded now if need be, on the steerer's model when that is loaded). Hold the model lock."""
        if self._inspector is None:
            from saeforge.features.inspect import Inspector

            lm = self._steerer.lm if self._steerer is not None else None
            try:
                self._inspector = Inspector(self.path, model=self.model, device=self.device, lm=lm)
            except SaeforgeError as err:
                raise WebError(503, f"the prompt inspector could not load the model: {err.problem}",
                               err.fix) from err
        return self._inspector

    def inspect(self, text: str, top: int = 5) -> dict:
        if len(text) > self.max_prompt_chars:
            raise WebError(413, f"the prompt has {len(text):,} characters; the limit is {self.max_prompt_chars:,}",
                           f"shorten it (the token limit is {self.max_prompt_tokens()})")
        if not 1 <= top <= 50:
            raise WebError(400, f"top {top} is out of range", "use 1..50")
        if not self.sae_folders:
            raise WebError(404, "this run has no SAEs to inspect a prompt with")
        with self._model_lock:  # one model, one forward pass at a time
            inspector = self._load_inspector()
            try:
                tokens = inspector.inspect(text, top)
            except SaeforgeError as err:
                status = 413 if "limit" in err.problem else 400
                raise WebError(status, err.problem, err.fix) from err
        # top tokens and density of every feature shown, so unexplained ones still say something
        info: dict[str, dict[int, dict]] = {}
        if self.has_store:
            st = self.store()
            ids = {s["name"]: s["id"] for s in st.saes()}
            for name in inspector.saes:
                idxs = sorted({f[0] for row in tokens for f in row["features"].get(name, [])})
                if name in ids:
                    info[name] = _brief_features(st, ids[name], idxs)
        return {"text": text, "top": top, "max_tokens": inspector.max_tokens,
                "saes": list(inspector.saes), "tokens": tokens, "feature_info": info}

    # ------------------------------------------------------------------------------------------------- steering
    def steer_saes(self) -> list[dict]:
        """The SAEs the playground can steer with: name and number of features (from the store, else cfg.json)."""
        from saeforge.saes import read_sae_config

        in_store = {s["name"]: s["d_sae"] for s in self.store().saes()} if self.has_store else {}
        out = []
        for name, folder in self.sae_folders.items():
            d_sae = in_store.get(name)
            if d_sae is None:
                try:
                    d_sae = int(read_sae_config(folder).get("d_sae") or 0) or None
                except (SaeforgeError, TypeError, ValueError):
                    d_sae = None
            out.append({"name": name, "d_sae": d_sae})
        return out

    def _load_steerer(self):
        """The steerer (loaded now if need be, on the inspector's model when that is loaded). Hold the model lock."""
        if self._steerer is None:
            from saeforge.interventions.steering import Steerer

            lm = self._inspector.lm if self._inspector is not None else None
            try:
                self._steerer = Steerer.from_run(self.path, lm=lm, model=self.model, device=self.device)
            except SaeforgeError as err:
                raise WebError(503, f"the steering playground could not load the model: {err.problem}",
                               err.fix) from err
        return self._steerer

    def steer(self, prompts: list[str], edits: list[dict], *, positions: str = "all", max_new_tokens: int = 32,
              temperature: float = 0.7, seed: int = 0) -> dict:
        """Baseline and steered continuations of ``prompts`` under the feature ``edits`` (dicts with sae, feature,
        mode, strength, unit; sae defaults to the run's first SAE), as
        :func:`~saeforge.interventions.generate.run_steering` gives them, with the measured effect.

        404 for an unknown SAE or a feature index out of range; 413 for too many prompts or edits, or a prompt too
        long; 400 for anything else out of range (a NaN or absurd strength, tokens, temperature, seed, mode...)."""
        import time

        from saeforge.interventions.generate import run_steering
        from saeforge.interventions.steering import MAX_STRENGTH, MODES, UNITS, FeatureEdit

        if not prompts:
            raise WebError(400, "no prompt given", "type a prompt (one per line for several)")
        if len(prompts) > MAX_STEER_PROMPTS:
            raise WebError(413, f"{len(prompts)} prompts; the limit is {MAX_STEER_PROMPTS} a request",
                           f"steer at most {MAX_STEER_PROMPTS} prompts at a time")
        for i, p in enumerate(prompts, 1):
            if len(p) > self.max_prompt_chars:
                raise WebError(413, f"prompt {i} has {len(p):,} characters; the limit is {self.max_prompt_chars:,}",
                               "shorten it")
            if not p.strip():
                raise WebError(400, f"prompt {i} is empty", "give every prompt some text")
        if not edits:
            raise WebError(400, "no feature to steer", "add a feature row: SAE, feature index, mode and strength")
        if len(edits) > MAX_STEER_EDITS:
            raise WebError(413, f"{len(edits)} feature edits; the limit is {MAX_STEER_EDITS} a request",
                           f"steer at most {MAX_STEER_EDITS} features at a time")
        if positions not in ("all", "generated"):
            raise WebError(400, f"unknown positions {positions!r}", "use all or generated")
        if not 1 <= max_new_tokens <= MAX_STEER_NEW_TOKENS:
            raise WebError(400, f"max_new_tokens {max_new_tokens} is out of range",
                           f"use 1..{MAX_STEER_NEW_TOKENS}")
        if not (isinstance(temperature, (int, float)) and 0 <= temperature <= MAX_STEER_TEMPERATURE):
            raise WebError(400, f"temperature {temperature!r} is out of range",
                           f"use a number in 0..{MAX_STEER_TEMPERATURE:g} (0: greedy)")
        if not 0 <= seed <= MAX_STEER_SEED:
            raise WebError(400, f"seed {seed} is out of range", f"use 0..{MAX_STEER_SEED}")
        default = next(iter(self.sae_folders), None)
        if default is None:
            raise WebError(404, "this run has no SAEs to steer with")
        parsed = []
        for i, e in enumerate(edits, 1):
            mode, unit = e.get("mode") or "add", e.get("unit") or "max"
            if mode not in MODES:
                raise WebError(400, f"unknown steering mode {mode!r}", f"use one of {', '.join(MODES)}")
            if unit not in UNITS:
                raise WebError(400, f"unknown strength unit {unit!r}", f"use one of {', '.join(UNITS)}")
            if e.get("feature") is None:
                raise WebError(400, f"feature row {i} has no feature index", "type the feature's index")
            strength = e.get("strength")
            if strength is None:  # what a browser sends for an empty or non-numeric field (JSON has no NaN)
                strength = float("nan")
            parsed.append(FeatureEdit(e.get("sae") or default, int(e["feature"]), mode, strength, unit))

        t0 = time.perf_counter()
        with self._model_lock:  # one model: one generation at a time, and no inspection while it is steered
            steerer = self._load_steerer()
            for e in parsed:
                if e.sae not in steerer.saes:
                    raise WebError(404, f"no SAE {e.sae!r} in this run", f"the run has: {', '.join(steerer.saes)}")
                d_sae = steerer.saes[e.sae][0].cfg.d_sae
                try:
                    e.validate(d_sae)
                except SaeforgeError as err:  # the feature index (404) or the strength (400)
                    raise WebError(404 if not 0 <= e.feature < d_sae else 400, err.problem, err.fix) from err
                if e.mode != "scale":
                    try:
                        steerer.value(e)  # 'max' units need the feature's max activation
                    except SaeforgeError as err:
                        raise WebError(400, err.problem, err.fix) from err
            try:
                run = run_steering(steerer, prompts, parsed, positions=positions, max_new_tokens=max_new_tokens,
                                   temperature=float(temperature), seed=seed)
            except SaeforgeError as err:  # a prompt too long for the model's context (413), or empty (400)
                status = 413 if "tokens" in err.problem and "context" in err.problem else 400
                raise WebError(status, err.problem, err.fix) from err
        seconds = time.perf_counter() - t0
        info: dict[str, dict[int, dict]] = {}
        if self.has_store:
            st = self.store()
            ids = {s["name"]: s["id"] for s in st.saes()}
            for name in sorted({e.sae for e in parsed}):
                if name in ids:
                    info[name] = _brief_features(st, ids[name], sorted({e.feature for e in parsed if e.sae == name}))
        return _finite({
            "prompts": run.prompts, "baseline": run.baseline, "steered": run.steered, "metrics": run.metrics,
            "edits": [{"sae": e.sae, "feature": e.feature, "mode": e.mode, "strength": e.strength, "unit": e.unit}
                      for e in parsed],
            "positions": positions, "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
            "feature_info": info, "limits": {"max_strength": MAX_STRENGTH}, "seconds": round(seconds, 3)})


def _finite(obj):
    """``obj`` with NaN and ±Inf floats as None (JSON has neither; an overflowing perplexity must not be a 500)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _count_explained(store: FeatureStore, sae_id: int) -> int:
    return int(store.con.execute("SELECT COUNT(*) FROM features WHERE sae_id = ? AND explanation IS NOT NULL",
                                 (sae_id,)).fetchone()[0])


def _brief_features(store: FeatureStore, sae_id: int, idxs: list[int]) -> dict[int, dict[str, Any]]:
    """Explanation, density and top tokens of a few features (for the neighbour list), in one query."""
    if not idxs:
        return {}
    rows = store.con.execute(f"SELECT idx, density, top_tokens, explanation, score FROM features WHERE sae_id = ? "
                             f"AND idx IN ({','.join('?' * len(idxs))})", (sae_id, *idxs))
    return {r["idx"]: {"density": r["density"], "explanation": r["explanation"], "score": r["score"],
                       "top_tokens": json.loads(r["top_tokens"]) if r["top_tokens"] else []} for r in rows}


def _examples(store: FeatureStore, sae_id: int, idx: int) -> dict[str, list[dict]]:
    """A feature's examples grouped by kind, as ``FeatureStore.feature`` gives them (plus ``peak_offset``, the peak's
    position in the window), read with two queries and decoding only the tokens inside the windows (the store's
    ``examples`` decodes whole contexts: several times slower for the feature page)."""
    rows = store.con.execute("SELECT kind, rank, context, start, peak, max_act, acts FROM examples "
                             "WHERE sae_id = ? AND idx = ? ORDER BY kind, rank", (sae_id, idx)).fetchall()
    out: dict[str, list[dict]] = {"top": [], "quantile": [], "random": []}
    if not rows:
        return out
    ctx_ids = sorted({r["context"] for r in rows})
    contexts = {r[0]: np.frombuffer(r[1], dtype=np.int32) for r in store.con.execute(
        f"SELECT id, ids FROM contexts WHERE id IN ({','.join('?' * len(ctx_ids))})", ctx_ids)}
    windows = []
    for r in rows:
        acts = np.frombuffer(r["acts"], dtype=np.float16).astype(np.float32)
        windows.append((r, acts, contexts[r["context"]][r["start"]:r["start"] + len(acts)]))
    vocab = store.vocab_texts(np.concatenate([w[2] for w in windows]))
    for r, acts, ids in windows:
        out.setdefault(r["kind"], []).append({
            "kind": r["kind"], "rank": r["rank"], "context": r["context"], "start": r["start"], "peak": r["peak"],
            "peak_offset": r["peak"] - r["start"], "max_act": r["max_act"], "token_ids": ids.tolist(),
            "tokens": [vocab.get(int(t), "") for t in ids], "acts": acts.tolist()})
    return out
