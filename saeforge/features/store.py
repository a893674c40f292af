"""FeatureStore: everything known about an SAE's features, in one SQLite file (``features.sqlite``).

Schema (version ``SCHEMA_VERSION``; WAL mode so the dashboard can read while ``explain`` writes):

- ``meta(key, value)``: schema version, model, corpus, harvested token count, harvest settings;
- ``saes(id, name, site, d_sae, architecture, path)``;
- ``contexts(id, ids)``: the token ids of every harvested context (int32 blob);
- ``vocab(id, text)``: the decoded text of every token id that occurs, for display without a tokenizer;
- ``features(sae_id, idx, density, fire_count, max_act, mean_act, quantiles, histogram, top_tokens, promoted,
  suppressed, neighbors, explanation, score, explainer, explained_at)``: JSON columns for the small lists;
- ``examples(sae_id, idx, kind, rank, context, start, peak, max_act, acts)``: windows of a context with the feature's
  per-token activations (float16 blob); ``kind`` is ``top``, ``quantile`` (``rank`` = bin) or ``random`` (not firing).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from saeforge.errors import SaeforgeError

SCHEMA_VERSION = 1
STORE_FILE = "features.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS saes (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, site TEXT NOT NULL,
    d_sae INTEGER NOT NULL, architecture TEXT, path TEXT);
CREATE TABLE IF NOT EXISTS contexts (id INTEGER PRIMARY KEY, ids BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS vocab (id INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS features (
    sae_id INTEGER NOT NULL, idx INTEGER NOT NULL, density REAL NOT NULL, fire_count INTEGER NOT NULL,
    max_act REAL NOT NULL, mean_act REAL NOT NULL, quantiles TEXT, histogram TEXT, top_tokens TEXT,
    promoted TEXT, suppressed TEXT, neighbors TEXT, explanation TEXT, score REAL, explainer TEXT,
    explained_at TEXT, PRIMARY KEY (sae_id, idx));
CREATE INDEX IF NOT EXISTS features_density ON features (sae_id, density);
CREATE TABLE IF NOT EXISTS examples (
    sae_id INTEGER NOT NULL, idx INTEGER NOT NULL, kind TEXT NOT NULL, rank INTEGER NOT NULL,
    context INTEGER NOT NULL, start INTEGER NOT NULL, peak INTEGER NOT NULL, max_act REAL NOT NULL,
    acts BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS examples_feature ON examples (sae_id, idx, kind, rank);
"""
JSON_COLUMNS = ("quantiles", "histogram", "top_tokens", "promoted", "suppressed", "neighbors")


def _migrate(con: sqlite3.Connection, version: int) -> None:
    """Bring an older store up to SCHEMA_VERSION. Version 1 is the first; later versions add steps here."""
    if version < 1:
        raise SaeforgeError(f"feature store schema version {version} is older than any saeforge wrote",
                            "harvest again: saeforge harvest RUN_DIR")


class FeatureStore:
    """Open a store. ``create=True`` makes a new, empty one (the file must not exist)."""

    def __init__(self, path: str | Path, *, create: bool = False, readonly: bool = False):
        self.path = Path(path)
        if create:
            if self.path.exists():
                raise SaeforgeError(f"{self.path} already exists", "delete it or choose another path")
        elif not self.path.is_file():
            raise SaeforgeError(f"no feature store at {self.path}", "run `saeforge harvest RUN_DIR` first")
        uri = f"file:{self.path}?mode=ro" if readonly else str(self.path)
        try:
            self.con = sqlite3.connect(uri, uri=readonly, check_same_thread=False, timeout=30)
            self.con.row_factory = sqlite3.Row
            if create:
                self.con.executescript(SCHEMA)
                self.set_meta("schema_version", SCHEMA_VERSION)
                self.set_meta("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
                self.con.commit()
            version = int(self.meta("schema_version", 0))
        except sqlite3.DatabaseError as err:
            raise SaeforgeError(f"{self.path} is not a readable feature store: {err}",
                                "harvest again: saeforge harvest RUN_DIR") from err
        if version > SCHEMA_VERSION:
            raise SaeforgeError(f"{self.path} has schema version {version}, newer than this saeforge reads "
                                f"({SCHEMA_VERSION})", "upgrade saeforge")
        if version < SCHEMA_VERSION:
            if readonly:
                raise SaeforgeError(f"{self.path} has the older schema version {version}",
                                    "open it writable once (e.g. saeforge explain) to migrate it, or harvest again")
            _migrate(self.con, version)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------- meta
    def set_meta(self, key: str, value: Any) -> None:
        self.con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self, key: str, default: Any = None) -> Any:
        try:
            row = self.con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:
            return default
        return json.loads(row[0]) if row else default

    def all_meta(self) -> dict[str, Any]:
        return {r["key"]: json.loads(r["value"]) for r in self.con.execute("SELECT key, value FROM meta")}

    # ----------------------------------------------------------------------------------------------- writing
    def add_sae(self, name: str, site: str, d_sae: int, architecture: str, path: str) -> int:
        cur = self.con.execute("INSERT INTO saes (name, site, d_sae, architecture, path) VALUES (?, ?, ?, ?, ?)",
                               (name, site, d_sae, architecture, path))
        return int(cur.lastrowid)

    def add_contexts(self, contexts: np.ndarray, first_id: int) -> None:
        self.con.executemany("INSERT INTO contexts (id, ids) VALUES (?, ?)",
                             ((first_id + i, c.astype(np.int32).tobytes()) for i, c in enumerate(contexts)))

    def add_vocab(self, texts: dict[int, str]) -> None:
        self.con.executemany("INSERT OR REPLACE INTO vocab (id, text) VALUES (?, ?)", texts.items())

    def add_features(self, sae_id: int, rows: Iterable[dict]) -> None:
        cols = ("idx", "density", "fire_count", "max_act", "mean_act") + JSON_COLUMNS
        sql = f"INSERT INTO features (sae_id, {', '.join(cols)}) VALUES (?, {', '.join('?' * len(cols))})"
        self.con.executemany(sql, ((sae_id, *(json.dumps(r[c]) if c in JSON_COLUMNS else r[c] for c in cols))
                                   for r in rows))

    def add_examples(self, sae_id: int, rows: Iterable[tuple]) -> None:
        """rows: (idx, kind, rank, context, start, peak, max_act, acts float array)."""
        self.con.executemany(
            "INSERT INTO examples (sae_id, idx, kind, rank, context, start, peak, max_act, acts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ((sae_id, i, k, r, c, s, p, m, np.asarray(a, dtype=np.float16).tobytes()) for i, k, r, c, s, p, m, a in rows))

    def set_explanation(self, sae: str, idx: int, explanation: str, score: float | None, explainer: str) -> None:
        sae_id = self.sae_id(sae)
        with self.con:
            self.con.execute("UPDATE features SET explanation = ?, score = ?, explainer = ?, explained_at = ? "
                             "WHERE sae_id = ? AND idx = ?",
                             (explanation, score, explainer, time.strftime("%Y-%m-%dT%H:%M:%S"), sae_id, idx))

    def commit(self) -> None:
        self.con.commit()

    # ----------------------------------------------------------------------------------------------- reading
    def saes(self) -> list[dict]:
        return [dict(r) for r in self.con.execute("SELECT * FROM saes ORDER BY id")]

    def sae_id(self, name: str) -> int:
        row = self.con.execute("SELECT id FROM saes WHERE name = ?", (name,)).fetchone()
        if row is None:
            names = [s["name"] for s in self.saes()]
            raise SaeforgeError(f"no SAE named {name!r} in {self.path}", f"the store holds: {', '.join(names)}")
        return int(row[0])

    def sae(self, name: str) -> dict:
        return dict(self.con.execute("SELECT * FROM saes WHERE id = ?", (self.sae_id(name),)).fetchone())

    def check_index(self, sae: str, idx: int) -> int:
        d_sae = self.sae(sae)["d_sae"]
        if not 0 <= idx < d_sae:
            raise SaeforgeError(f"feature {idx} is out of range: SAE {sae!r} has features 0..{d_sae - 1}",
                                f"pick an index below {d_sae}")
        return self.sae_id(sae)

    def vocab_texts(self, ids: Iterable[int]) -> dict[int, str]:
        ids = sorted({int(i) for i in ids})
        out: dict[int, str] = {}
        for chunk in range(0, len(ids), 900):
            part = ids[chunk:chunk + 900]
            rows = self.con.execute(f"SELECT id, text FROM vocab WHERE id IN ({','.join('?' * len(part))})", part)
            out.update({r[0]: r[1] for r in rows})
        return out

    def context_ids(self, context: int) -> np.ndarray:
        row = self.con.execute("SELECT ids FROM contexts WHERE id = ?", (context,)).fetchone()
        return np.frombuffer(row[0], dtype=np.int32)

    def _feature_row(self, sae_id: int, idx: int) -> dict:
        row = self.con.execute("SELECT * FROM features WHERE sae_id = ? AND idx = ?", (sae_id, idx)).fetchone()
        if row is None:
            raise SaeforgeError(f"feature {idx} has no record", "harvest again")
        out = dict(row)
        for c in JSON_COLUMNS:
            out[c] = json.loads(out[c]) if out[c] else None
        return out

    def examples(self, sae: str, idx: int, kind: str | None = None) -> list[dict]:
        """Examples with their tokens (as text) and per-token activations."""
        sae_id = self.check_index(sae, idx)
        sql = "SELECT * FROM examples WHERE sae_id = ? AND idx = ?" + (" AND kind = ?" if kind else "")
        rows = self.con.execute(sql + " ORDER BY kind, rank", (sae_id, idx, *([kind] if kind else []))).fetchall()
        out = []
        contexts = {r["context"]: self.context_ids(r["context"]) for r in rows}
        vocab = self.vocab_texts(np.concatenate(list(contexts.values())) if contexts else [])
        for r in rows:
            acts = np.frombuffer(r["acts"], dtype=np.float16).astype(np.float32)
            ids = contexts[r["context"]][r["start"]:r["start"] + len(acts)]
            out.append({"kind": r["kind"], "rank": r["rank"], "context": r["context"], "start": r["start"],
                        "peak": r["peak"], "max_act": r["max_act"], "token_ids": ids.tolist(),
                        "tokens": [vocab.get(int(t), "") for t in ids], "acts": acts.tolist()})
        return out

    def feature(self, sae: str, idx: int, with_examples: bool = True) -> dict:
        sae_id = self.check_index(sae, idx)
        out = self._feature_row(sae_id, idx)
        out["sae"] = sae
        if with_examples:
            ex = self.examples(sae, idx)
            out["examples"] = {k: [e for e in ex if e["kind"] == k] for k in ("top", "quantile", "random")}
        return out

    def list_features(self, sae: str, *, order: str = "density", offset: int = 0, limit: int = 50,
                      query: str = "", token: str = "") -> list[dict]:
        """Features of an SAE, optionally filtered by text in the explanation and/or by a top-activating token."""
        sae_id = self.sae_id(sae)
        order_sql = {"density": "density DESC", "index": "idx", "score": "score DESC", "max_act": "max_act DESC"}
        if order not in order_sql:
            raise SaeforgeError(f"unknown order {order!r}", f"use one of {', '.join(order_sql)}")
        where, args = ["sae_id = ?"], [sae_id]
        if query:
            where.append("explanation LIKE ?")
            args.append(f"%{query}%")
        if token:
            where.append("top_tokens LIKE ?")
            args.append(f"%{json.dumps(token)[1:-1]}%")
        rows = self.con.execute(
            f"SELECT idx, density, max_act, mean_act, top_tokens, explanation, score FROM features "
            f"WHERE {' AND '.join(where)} ORDER BY {order_sql[order]} LIMIT ? OFFSET ?", (*args, limit, offset))
        out = []
        for r in rows:
            d = dict(r)
            d["top_tokens"] = json.loads(d["top_tokens"]) if d["top_tokens"] else []
            out.append(d)
        return out

    def explained(self, sae: str) -> set[int]:
        sae_id = self.sae_id(sae)
        return {r[0] for r in self.con.execute(
            "SELECT idx FROM features WHERE sae_id = ? AND explanation IS NOT NULL", (sae_id,))}

    def explanations(self, sae: str, idxs: Iterable[int]) -> dict[int, str]:
        sae_id = self.sae_id(sae)
        idxs = list(idxs)
        if not idxs:
            return {}
        rows = self.con.execute(f"SELECT idx, explanation FROM features WHERE sae_id = ? AND idx IN "
                                f"({','.join('?' * len(idxs))}) AND explanation IS NOT NULL", (sae_id, *idxs))
        return {r[0]: r[1] for r in rows}
