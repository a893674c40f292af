"""FeatureStore: everything known about an SAE's features, in one SQLite file (``features.sqlite``).

Every SQL statement of saeforge lives in this module; the rest of the code reads and writes through its methods.

Schema (version ``SCHEMA_VERSION``; WAL mode so the dashboard can read while ``explain`` writes):

- ``meta(key, value)``: schema version, model, corpus, harvested token count, harvest settings (JSON values);
- ``saes(id, name, site, d_sae, architecture, path, weights_hash)``: ``weights_hash`` identifies the SAE's weights,
  so a re-harvest knows whether explanations still describe the same features;
- ``contexts(id, ids)``: the token ids of every harvested context (int32 blob);
- ``vocab(id, text)``: the decoded text of every token id that occurs, for display without a tokenizer;
- ``features(sae_id, idx, density, fire_count, max_act, mean_act, quantiles, histogram, top_tokens, promoted,
  suppressed, neighbors, explanation, score, explainer, explained_at, explainer_model, explanation_source,
  score_chance, score_detail)``: JSON columns for the small lists. ``explainer_model`` names the back end and model
  that wrote the explanation, ``explanation_source`` says how it was obtained (``llm``, ``llm-retry`` or
  ``top-tokens``, the fallback label), ``score_chance`` is what a judge guessing at random scores on average and
  ``score_detail`` (JSON) the scorers' counts;
- ``examples(sae_id, idx, kind, rank, context, start, peak, max_act, acts)``: windows of a context with the feature's
  per-token activations (float16 blob); ``kind`` is ``top``, ``quantile`` (``rank`` = bin) or ``random`` (not firing);
- ``links(kind, src_sae, src_idx, dst_sae, dst_idx, weight, data)``: relations between features of one or two SAEs
  of the store (``kind``: e.g. ``flow``, ``parent``, ``module``, ``circuit``), with a weight and optional JSON data;
  indexed both ways, for the successors and the predecessors of a feature.

A store is created by running every schema step in order, and an older store is upgraded by running the steps it
lacks, in one transaction (:func:`_migrate`); so a migrated store and a new one have the same schema.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from saeforge.errors import SaeforgeError

STORE_FILE = "features.sqlite"
# What the writers of a store (harvest, explain) name in the run folder's lock (saeforge.utils.locking).
WRITER_LOCK = "saeforge harvest/explain"

# Schema steps: SCHEMA_STEPS[v] takes a store from version v - 1 to version v. Never edit a released step; add one.
SCHEMA_STEPS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS saes (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, site TEXT NOT NULL, "
        "d_sae INTEGER NOT NULL, architecture TEXT, path TEXT)",
        "CREATE TABLE IF NOT EXISTS contexts (id INTEGER PRIMARY KEY, ids BLOB NOT NULL)",
        "CREATE TABLE IF NOT EXISTS vocab (id INTEGER PRIMARY KEY, text TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS features (sae_id INTEGER NOT NULL, idx INTEGER NOT NULL, density REAL NOT NULL, "
        "fire_count INTEGER NOT NULL, max_act REAL NOT NULL, mean_act REAL NOT NULL, quantiles TEXT, histogram TEXT, "
        "top_tokens TEXT, promoted TEXT, suppressed TEXT, neighbors TEXT, explanation TEXT, score REAL, "
        "explainer TEXT, explained_at TEXT, PRIMARY KEY (sae_id, idx))",
        "CREATE INDEX IF NOT EXISTS features_density ON features (sae_id, density)",
        "CREATE TABLE IF NOT EXISTS examples (sae_id INTEGER NOT NULL, idx INTEGER NOT NULL, kind TEXT NOT NULL, "
        "rank INTEGER NOT NULL, context INTEGER NOT NULL, start INTEGER NOT NULL, peak INTEGER NOT NULL, "
        "max_act REAL NOT NULL, acts BLOB NOT NULL)",
        "CREATE INDEX IF NOT EXISTS examples_feature ON examples (sae_id, idx, kind, rank)",
    ),
    2: (
        "ALTER TABLE saes ADD COLUMN weights_hash TEXT",
        "ALTER TABLE features ADD COLUMN explainer_model TEXT",
        "ALTER TABLE features ADD COLUMN explanation_source TEXT",
        "ALTER TABLE features ADD COLUMN score_chance REAL",
        "ALTER TABLE features ADD COLUMN score_detail TEXT",
        # what version 1 wrote into `explainer` ("local:embedded | detection=0.650") says who wrote it; balanced
        # accuracy, the only score version 1 stored, is 0.5 for a judge that guesses
        "UPDATE features SET explainer_model = trim(CASE WHEN instr(explainer, ' | ') > 0 "
        "THEN substr(explainer, 1, instr(explainer, ' | ') - 1) ELSE explainer END), explanation_source = 'llm', "
        "score_chance = CASE WHEN score IS NULL THEN NULL ELSE 0.5 END WHERE explanation IS NOT NULL",
        "CREATE TABLE IF NOT EXISTS links (kind TEXT NOT NULL, src_sae INTEGER NOT NULL, src_idx INTEGER NOT NULL, "
        "dst_sae INTEGER NOT NULL, dst_idx INTEGER NOT NULL, weight REAL, data TEXT)",
        "CREATE INDEX IF NOT EXISTS links_out ON links (src_sae, src_idx, kind)",
        "CREATE INDEX IF NOT EXISTS links_in ON links (dst_sae, dst_idx, kind)",
        "CREATE INDEX IF NOT EXISTS links_pair ON links (kind, src_sae, dst_sae)",
    ),
}
SCHEMA_VERSION = max(SCHEMA_STEPS)
HARVEST_JSON_COLUMNS = ("quantiles", "histogram", "top_tokens", "promoted", "suppressed", "neighbors")
JSON_COLUMNS = HARVEST_JSON_COLUMNS + ("score_detail",)
# What an explanation carries over a re-harvest of the same SAE.
EXPLANATION_COLUMNS = ("explanation", "score", "explainer", "explained_at", "explainer_model", "explanation_source",
                       "score_chance", "score_detail")
# Feature list orders: name -> SQL (``relevance`` needs a token search; it falls back to density without one).
ORDERS = {"density": "f.density DESC, f.idx", "density_asc": "f.density ASC, f.idx", "index": "f.idx",
          "score": "f.score IS NULL, f.score DESC, f.idx", "max_act": "f.max_act DESC, f.idx",
          "relevance": "f.density DESC, f.idx"}
MAX_SEARCH_CHARS = 200
# Token-search relevance: the token's share of a feature's strongest activations (hits of min(100, times fired)),
# shrunk towards 0 by this many pseudo-activations, so that a feature seen once on the token does not outrank one
# with 73 of its 100 strongest activations there.
RELEVANCE_PRIOR = 10
LINK_DIRECTIONS = ("out", "in")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _read_version(con: sqlite3.Connection) -> int:
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError:  # no meta table: not a store
        return 0
    return int(json.loads(row[0])) if row else 0


def _migrate(con: sqlite3.Connection, version: int) -> None:
    """Bring a store from ``version`` up to SCHEMA_VERSION in one transaction (all steps or none)."""
    if version < 1:
        raise SaeforgeError(f"feature store schema version {version} is older than any saeforge wrote",
                            "harvest again: saeforge harvest RUN_DIR")
    con.execute("BEGIN IMMEDIATE")
    try:
        version = _read_version(con)  # another process may have migrated it while this one waited for the lock
        if version == SCHEMA_VERSION:
            con.commit()
            return
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in SCHEMA_STEPS[step]:
                con.execute(statement)
        con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (json.dumps(SCHEMA_VERSION),))
        con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('migrated', ?)",
                    (json.dumps(f"{version} -> {SCHEMA_VERSION} at {_now()}"),))
        con.commit()
    except BaseException:
        con.rollback()
        raise


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


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
                for step in sorted(SCHEMA_STEPS):
                    for statement in SCHEMA_STEPS[step]:
                        if not statement.startswith("UPDATE"):  # data fix-ups of old stores: nothing to fix here
                            self.con.execute(statement)
                self.set_meta("schema_version", SCHEMA_VERSION)
                self.set_meta("created", _now())
                self.con.commit()
            version = _read_version(self.con)
        except sqlite3.DatabaseError as err:
            with contextlib.suppress(Exception):
                self.con.close()
            raise SaeforgeError(f"{self.path} is not a readable feature store: {err}",
                                "harvest again: saeforge harvest RUN_DIR") from err
        if version > SCHEMA_VERSION:
            self.con.close()
            raise SaeforgeError(f"{self.path} has schema version {version}, newer than this saeforge reads "
                                f"({SCHEMA_VERSION})", "upgrade saeforge")
        if version < SCHEMA_VERSION:
            if readonly:
                self.con.close()
                raise SaeforgeError(f"{self.path} has the older schema version {version}",
                                    "open it writable once (e.g. saeforge explain) to migrate it, or harvest again")
            try:
                _migrate(self.con, version)
            except BaseException:
                self.con.close()
                raise

    @classmethod
    def ensure_current(cls, path: str | Path) -> None:
        """Check that ``path`` is a store this saeforge reads, migrating an older one in place (the dashboard calls
        this once before it opens read-only connections). Raises :class:`SaeforgeError` with the reason otherwise."""
        path = Path(path)
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                version = _read_version(con)
            finally:
                con.close()
        except (sqlite3.DatabaseError, ValueError, TypeError) as err:
            raise SaeforgeError(f"{path} is not a readable feature store ({err})",
                                "harvest again: saeforge harvest RUN_DIR") from err
        if version < SCHEMA_VERSION:
            cls(path).close()  # migrates, or raises with the reason (e.g. too old to migrate)
        cls(path, readonly=True).close()  # a newer version raises here

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

    def schema(self) -> dict[str, list[tuple]]:
        """Every table's columns (name, type, not null, default, primary key) and every index's (table, unique,
        columns), by name: what a migration must reproduce, whatever the spacing of the SQL that made it."""
        out: dict[str, list[tuple]] = {}
        for kind, name, table in self.con.execute(
                "SELECT type, name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index') ORDER BY name"):
            if kind == "table":
                out[name] = [tuple(r)[1:] for r in self.con.execute(f"PRAGMA table_info({name})")]
            else:
                unique = [tuple(r)[2] for r in self.con.execute(f"PRAGMA index_list({table})") if r[1] == name]
                out[name] = [(table, *unique), *(tuple(r)[1:] for r in self.con.execute(f"PRAGMA index_info({name})"))]
        return out

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check``: ``"ok"`` or the problems found."""
        return "\n".join(r[0] for r in self.con.execute("PRAGMA integrity_check"))

    # ----------------------------------------------------------------------------------------------- writing
    def begin_bulk_load(self) -> None:
        """Fast writes for a store being built under a temporary name (no journal: a crash loses the file anyway)."""
        self.con.execute("PRAGMA journal_mode = OFF")
        self.con.execute("PRAGMA synchronous = OFF")

    def end_bulk_load(self) -> None:
        """Commit and switch the store to WAL, the mode readers and ``explain`` use."""
        self.con.commit()
        self.con.execute("PRAGMA synchronous = FULL")
        self.con.execute("PRAGMA journal_mode = WAL")

    def add_sae(self, name: str, site: str, d_sae: int, architecture: str, path: str,
                weights_hash: str | None = None) -> int:
        cur = self.con.execute("INSERT INTO saes (name, site, d_sae, architecture, path, weights_hash) "
                               "VALUES (?, ?, ?, ?, ?, ?)", (name, site, d_sae, architecture, path, weights_hash))
        return int(cur.lastrowid)

    def add_contexts(self, contexts: np.ndarray, first_id: int) -> None:
        self.con.executemany("INSERT INTO contexts (id, ids) VALUES (?, ?)",
                             ((first_id + i, c.astype(np.int32).tobytes()) for i, c in enumerate(contexts)))

    def add_vocab(self, texts: dict[int, str]) -> None:
        self.con.executemany("INSERT OR REPLACE INTO vocab (id, text) VALUES (?, ?)", texts.items())

    def add_features(self, sae_id: int, rows: Iterable[dict]) -> None:
        cols = ("idx", "density", "fire_count", "max_act", "mean_act") + HARVEST_JSON_COLUMNS
        sql = f"INSERT INTO features (sae_id, {', '.join(cols)}) VALUES (?, {_placeholders(len(cols))})"
        self.con.executemany(sql, ((sae_id, *(json.dumps(r[c]) if c in JSON_COLUMNS else r[c] for c in cols))
                                   for r in rows))

    def add_examples(self, sae_id: int, rows: Iterable[tuple]) -> None:
        """rows: (idx, kind, rank, context, start, peak, max_act, acts float array)."""
        self.con.executemany(
            "INSERT INTO examples (sae_id, idx, kind, rank, context, start, peak, max_act, acts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ((sae_id, i, k, r, c, s, p, m, np.asarray(a, dtype=np.float16).tobytes()) for i, k, r, c, s, p, m, a in rows))

    def set_explanation(self, sae: str, idx: int, explanation: str, score: float | None, explainer: str, *,
                        model: str | None = None, source: str = "llm", chance: float | None = None,
                        detail: dict | None = None) -> None:
        """Write one feature's explanation and score in one transaction. ``model``: the back end and model that
        wrote it (default: ``explainer`` up to its first " | "); ``source``: ``llm``, ``llm-retry`` or
        ``top-tokens``; ``chance``: the score a guessing judge gets on average; ``detail``: the scorers' counts."""
        sae_id = self.check_index(sae, idx)
        if model is None:
            model = explainer.split(" | ", 1)[0].strip()
        with self.con:
            self.con.execute(
                "UPDATE features SET explanation = ?, score = ?, explainer = ?, explained_at = ?, explainer_model = ?, "
                "explanation_source = ?, score_chance = ?, score_detail = ? WHERE sae_id = ? AND idx = ?",
                (explanation, score, explainer, _now(), model, source, chance,
                 json.dumps(detail) if detail is not None else None, sae_id, idx))

    def explanation_records(self, sae: str) -> list[dict]:
        """Every explained feature of ``sae`` with all its explanation columns (``idx`` included)."""
        sae_id = self.sae_id(sae)
        rows = self.con.execute(f"SELECT idx, {', '.join(EXPLANATION_COLUMNS)} FROM features "
                                f"WHERE sae_id = ? AND explanation IS NOT NULL ORDER BY idx", (sae_id,))
        return [dict(r) for r in rows]

    def restore_explanations(self, sae: str, records: Iterable[dict]) -> int:
        """Write back what :meth:`explanation_records` read (e.g. from the previous harvest of the same SAE), as
        they were, timestamps included. Returns how many features got theirs back."""
        sae_id = self.sae_id(sae)
        sql = (f"UPDATE features SET {', '.join(f'{c} = ?' for c in EXPLANATION_COLUMNS)} "
               f"WHERE sae_id = ? AND idx = ?")
        n = 0
        with self.con:
            for r in records:
                n += self.con.execute(sql, (*(r.get(c) for c in EXPLANATION_COLUMNS), sae_id, int(r["idx"]))).rowcount
        return n

    def commit(self) -> None:
        self.con.commit()

    # ----------------------------------------------------------------------------------------------- links
    def _link_rows(self, kind: str, src_sae: str, dst_sae: str, rows: Iterable[Sequence]) -> Iterator[tuple]:
        if not isinstance(kind, str) or not kind.strip():
            raise SaeforgeError(f"link kind {kind!r} is not a name", "pass a kind such as 'flow' or 'parent'")
        src = self.sae(src_sae)
        dst = self.sae(dst_sae)
        for n, row in enumerate(rows):
            if len(row) not in (2, 3, 4):
                raise SaeforgeError(f"link {n} has {len(row)} fields", "give (src_idx, dst_idx[, weight[, data]])")
            s, d = int(row[0]), int(row[1])
            weight = None if len(row) < 3 or row[2] is None else float(row[2])
            data = None if len(row) < 4 or row[3] is None else json.dumps(row[3])
            if not 0 <= s < src["d_sae"] or not 0 <= d < dst["d_sae"]:
                raise SaeforgeError(f"link {n} ({s} -> {d}) is out of range: {src_sae} has {src['d_sae']} features "
                                    f"and {dst_sae} {dst['d_sae']}", "check the feature indices")
            if weight is not None and not math.isfinite(weight):
                raise SaeforgeError(f"link {n} ({s} -> {d}) has the weight {weight}", "give finite weights or None")
            yield kind, src["id"], s, dst["id"], d, weight, data

    def add_links(self, kind: str, src_sae: str, dst_sae: str, rows: Iterable[Sequence], *,
                  replace: bool = False) -> int:
        """Add links of ``kind`` from features of ``src_sae`` to features of ``dst_sae`` (the same SAE or another in
        the store), in one transaction: all rows are written or none. ``rows``: (src_idx, dst_idx[, weight[, data]])
        with ``data`` any JSON value. ``replace=True`` first deletes every link of ``kind`` between the two SAEs (a
        re-run of an analysis replaces its results). Returns the number of links written."""
        with self.con:
            if replace:
                self.con.execute("DELETE FROM links WHERE kind = ? AND src_sae = ? AND dst_sae = ?",
                                 (kind, self.sae_id(src_sae), self.sae_id(dst_sae)))
            cur = self.con.executemany("INSERT INTO links (kind, src_sae, src_idx, dst_sae, dst_idx, weight, data) "
                                       "VALUES (?, ?, ?, ?, ?, ?, ?)", self._link_rows(kind, src_sae, dst_sae, rows))
        return int(cur.rowcount)

    def replace_links(self, kind: str, src_sae: str, dst_sae: str, rows: Iterable[Sequence]) -> int:
        """:meth:`add_links` with ``replace=True``."""
        return self.add_links(kind, src_sae, dst_sae, rows, replace=True)

    def delete_links(self, kind: str, src_sae: str | None = None, dst_sae: str | None = None) -> int:
        where, args = ["kind = ?"], [kind]
        for col, name in (("src_sae", src_sae), ("dst_sae", dst_sae)):
            if name is not None:
                where.append(f"{col} = ?")
                args.append(self.sae_id(name))
        with self.con:
            return int(self.con.execute(f"DELETE FROM links WHERE {' AND '.join(where)}", args).rowcount)

    def links(self, sae: str, idx: int, *, direction: str = "out", kind: str | None = None,
              other_sae: str | None = None, limit: int | None = None) -> list[dict]:
        """The links of feature ``idx`` of ``sae``: ``direction="out"`` its successors (it is the source), ``"in"``
        its predecessors. Largest absolute weight first. Each: kind, src_sae, src_idx, dst_sae, dst_idx, weight,
        data (SAE names, not ids)."""
        if direction not in LINK_DIRECTIONS:
            raise SaeforgeError(f"unknown link direction {direction!r}", "use 'out' (successors) or 'in'")
        me, other = ("src", "dst") if direction == "out" else ("dst", "src")
        where, args = [f"l.{me}_sae = ?", f"l.{me}_idx = ?"], [self.check_index(sae, idx), int(idx)]
        if kind is not None:
            where.append("l.kind = ?")
            args.append(kind)
        if other_sae is not None:
            where.append(f"l.{other}_sae = ?")
            args.append(self.sae_id(other_sae))
        sql = (f"SELECT l.kind, s.name AS src_sae, l.src_idx, d.name AS dst_sae, l.dst_idx, l.weight, l.data "
               f"FROM links l JOIN saes s ON s.id = l.src_sae JOIN saes d ON d.id = l.dst_sae "
               f"WHERE {' AND '.join(where)} ORDER BY abs(l.weight) DESC, l.{other}_idx")
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return [self._link(r) for r in self.con.execute(sql, args)]

    def successors(self, sae: str, idx: int, **kw) -> list[dict]:
        return self.links(sae, idx, direction="out", **kw)

    def predecessors(self, sae: str, idx: int, **kw) -> list[dict]:
        return self.links(sae, idx, direction="in", **kw)

    def links_between(self, kind: str, src_sae: str, dst_sae: str) -> list[dict]:
        """Every link of ``kind`` from ``src_sae`` to ``dst_sae``, by source then destination index."""
        rows = self.con.execute(
            "SELECT l.kind, s.name AS src_sae, l.src_idx, d.name AS dst_sae, l.dst_idx, l.weight, l.data "
            "FROM links l JOIN saes s ON s.id = l.src_sae JOIN saes d ON d.id = l.dst_sae "
            "WHERE l.kind = ? AND l.src_sae = ? AND l.dst_sae = ? ORDER BY l.src_idx, l.dst_idx",
            (kind, self.sae_id(src_sae), self.sae_id(dst_sae)))
        return [self._link(r) for r in rows]

    def link_summary(self) -> list[dict]:
        """Per (kind, source SAE, destination SAE): the number of links."""
        rows = self.con.execute(
            "SELECT l.kind, s.name AS src_sae, d.name AS dst_sae, COUNT(*) AS n FROM links l "
            "JOIN saes s ON s.id = l.src_sae JOIN saes d ON d.id = l.dst_sae GROUP BY l.kind, l.src_sae, l.dst_sae "
            "ORDER BY l.kind, s.name, d.name")
        return [dict(r) for r in rows]

    @staticmethod
    def _link(row) -> dict:
        out = dict(row)
        out["data"] = json.loads(out["data"]) if out["data"] is not None else None
        return out

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
            rows = self.con.execute(f"SELECT id, text FROM vocab WHERE id IN ({_placeholders(len(part))})", part)
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
        """Examples with their tokens (as text) and per-token activations, ordered by kind and rank; ``peak_offset``
        is the sampled token's position in the window. Two queries; only the tokens inside the windows are decoded
        (a feature page has ~60 windows of ~33 tokens over contexts of hundreds)."""
        sae_id = self.check_index(sae, idx)
        sql = ("SELECT kind, rank, context, start, peak, max_act, acts FROM examples WHERE sae_id = ? AND idx = ?"
               + (" AND kind = ?" if kind else "") + " ORDER BY kind, rank")
        rows = self.con.execute(sql, (sae_id, idx, *([kind] if kind else []))).fetchall()
        if not rows:
            return []
        ctx_ids = sorted({r["context"] for r in rows})
        contexts = {r[0]: np.frombuffer(r[1], dtype=np.int32) for r in self.con.execute(
            f"SELECT id, ids FROM contexts WHERE id IN ({_placeholders(len(ctx_ids))})", ctx_ids)}
        windows = []
        for r in rows:
            acts = np.frombuffer(r["acts"], dtype=np.float16).astype(np.float32)
            windows.append((r, acts, contexts[r["context"]][r["start"]:r["start"] + len(acts)]))
        vocab = self.vocab_texts(np.concatenate([w[2] for w in windows]))
        return [{"kind": r["kind"], "rank": r["rank"], "context": r["context"], "start": r["start"],
                 "peak": r["peak"], "peak_offset": r["peak"] - r["start"], "max_act": r["max_act"],
                 "token_ids": ids.tolist(), "tokens": [vocab.get(int(t), "") for t in ids], "acts": acts.tolist()}
                for r, acts, ids in windows]

    def feature(self, sae: str, idx: int, with_examples: bool = True) -> dict:
        sae_id = self.check_index(sae, idx)
        out = self._feature_row(sae_id, idx)
        out["sae"] = sae
        if with_examples:
            ex = self.examples(sae, idx)
            out["examples"] = {k: [e for e in ex if e["kind"] == k] for k in ("top", "quantile", "random")}
        return out

    def _search(self, sae_id: int, query: str, token: str, alive_only: bool) -> tuple[str, str, list]:
        """(FROM clause, WHERE clause, arguments) of a feature search. The token search matches a top token exactly
        (ignoring the spaces around it unless the query has some), through json_each, so no character of the query is
        a wildcard."""
        for name, value in (("explanation search", query), ("token search", token)):
            if len(value) > MAX_SEARCH_CHARS:
                raise SaeforgeError(f"the {name} has {len(value):,} characters; the limit is {MAX_SEARCH_CHARS}",
                                    "search for a shorter text")
        source, where, args = "features f", ["f.sae_id = ?"], [sae_id]
        if query:
            escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where.append("f.explanation LIKE ? ESCAPE '\\'")
            args.append(f"%{escaped}%")
        if alive_only:
            where.append("f.fire_count > 0")
        if token:
            source = ("features f JOIN (SELECT f2.idx AS t_idx, MIN(CAST(t.key AS INTEGER)) AS token_rank, "
                      "MAX(json_extract(t.value, '$[1]')) AS token_hits FROM features f2, json_each(f2.top_tokens) t "
                      "WHERE f2.sae_id = ? AND (json_extract(t.value, '$[0]') = ? OR "
                      "(? = trim(?) AND trim(json_extract(t.value, '$[0]')) = ?)) GROUP BY f2.idx) m "
                      "ON m.t_idx = f.idx")
            args = [sae_id, token, token, token, token, *args]
        return source, " AND ".join(where), args

    def list_features(self, sae: str, *, order: str = "density", offset: int = 0, limit: int = 50,
                      query: str = "", token: str = "", alive_only: bool = False) -> list[dict]:
        """Features of an SAE, optionally filtered by text in the explanation (case-insensitive, no wildcards), by a
        top-activating token (exact) and to those that fired. With a token each row has ``token_hits`` (how many of
        the feature's ``min(100, fire_count)`` strongest activations are on it), ``token_rank`` (its place among the
        feature's top tokens, 0 = first) and ``token_relevance`` = hits / (min(100, fire_count) + RELEVANCE_PRIOR),
        by which ``order="relevance"`` sorts (then hits, rank, density)."""
        sae_id = self.sae_id(sae)
        if order not in ORDERS:
            raise SaeforgeError(f"unknown order {order!r}", f"use one of {', '.join(ORDERS)}")
        source, where, args = self._search(sae_id, query, token, alive_only)
        order_sql = ORDERS[order]
        extra = ", NULL AS token_rank, NULL AS token_hits, NULL AS token_relevance"
        if token:
            extra = (f", m.token_rank, m.token_hits, "
                     f"CAST(m.token_hits AS REAL) / (MIN(100, f.fire_count) + {RELEVANCE_PRIOR}) AS token_relevance")
            if order == "relevance":
                order_sql = "token_relevance DESC, m.token_hits DESC, m.token_rank, f.density DESC, f.idx"
        rows = self.con.execute(
            f"SELECT f.idx, f.density, f.fire_count, f.max_act, f.mean_act, f.top_tokens, f.explanation, f.score, "
            f"f.score_chance, f.explanation_source{extra} FROM {source} WHERE {where} ORDER BY {order_sql} "
            f"LIMIT ? OFFSET ?", (*args, int(limit), int(offset)))
        out = []
        for r in rows:
            d = dict(r)
            d["top_tokens"] = json.loads(d["top_tokens"]) if d["top_tokens"] else []
            out.append(d)
        return out

    def count_features(self, sae: str, *, query: str = "", token: str = "", alive_only: bool = False) -> int:
        """How many features :meth:`list_features` would list with these filters."""
        source, where, args = self._search(self.sae_id(sae), query, token, alive_only)
        return int(self.con.execute(f"SELECT COUNT(*) FROM {source} WHERE {where}", args).fetchone()[0])

    def count_dead(self, sae: str) -> int:
        """Features that never fired on the harvested text."""
        return int(self.con.execute("SELECT COUNT(*) FROM features WHERE sae_id = ? AND fire_count = 0",
                                    (self.sae_id(sae),)).fetchone()[0])

    def count_explained(self, sae: str) -> int:
        return int(self.con.execute("SELECT COUNT(*) FROM features WHERE sae_id = ? AND explanation IS NOT NULL",
                                    (self.sae_id(sae),)).fetchone()[0])

    def brief_features(self, sae: str, idxs: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Explanation, score, density and top tokens of a few features (neighbour lists, the inspector), one query
        per 900 features."""
        sae_id = self.sae_id(sae)
        idxs = sorted({int(i) for i in idxs})
        out: dict[int, dict[str, Any]] = {}
        for chunk in range(0, len(idxs), 900):
            part = idxs[chunk:chunk + 900]
            rows = self.con.execute(f"SELECT idx, density, top_tokens, explanation, score FROM features "
                                    f"WHERE sae_id = ? AND idx IN ({_placeholders(len(part))})", (sae_id, *part))
            out.update({r["idx"]: {"density": r["density"], "explanation": r["explanation"], "score": r["score"],
                                   "top_tokens": json.loads(r["top_tokens"]) if r["top_tokens"] else []}
                        for r in rows})
        return out

    def max_activations(self, sae: str) -> np.ndarray:
        """float32 [d_sae]: each feature's largest activation on the harvested text (0 where a feature has no
        record or never fired), e.g. the unit of steering strengths."""
        info = self.sae(sae)
        out = np.zeros(int(info["d_sae"]), dtype=np.float32)
        rows = self.con.execute("SELECT idx, max_act FROM features WHERE sae_id = ?", (info["id"],)).fetchall()
        if rows:
            idx = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            out[idx] = np.fromiter((r[1] for r in rows), dtype=np.float64, count=len(rows))
        return out

    def explained(self, sae: str) -> set[int]:
        sae_id = self.sae_id(sae)
        return {r[0] for r in self.con.execute(
            "SELECT idx FROM features WHERE sae_id = ? AND explanation IS NOT NULL", (sae_id,))}

    def explanations(self, sae: str, idxs: Iterable[int]) -> dict[int, str]:
        sae_id = self.sae_id(sae)
        idxs = sorted({int(i) for i in idxs})
        out: dict[int, str] = {}
        for chunk in range(0, len(idxs), 900):
            part = idxs[chunk:chunk + 900]
            rows = self.con.execute(f"SELECT idx, explanation FROM features WHERE sae_id = ? AND idx IN "
                                    f"({_placeholders(len(part))}) AND explanation IS NOT NULL", (sae_id, *part))
            out.update({r[0]: r[1] for r in rows})
        return out


# --------------------------------------------------------------------------------------------------- swapping in
def _sidecars(path: Path) -> list[Path]:
    return [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal")]


def install_store(built: str | Path, target: str | Path) -> Path:
    """Put the complete store ``built`` (closed) in the place of ``target`` and delete ``built``.

    When ``target`` exists, ``built`` is copied into it with SQLite's backup API, as one write transaction on
    ``target``: a reader (the dashboard) sees the old store or the new one, never a mix, and the old store's write-ahead
    log (``-wal``, which may hold pages a killed writer never checkpointed) belongs to the file it was written for and
    is checkpointed and reset rather than replayed onto another database. Renaming the new file over the old one would
    leave that log next to a file it does not describe, and SQLite would apply it to the new store. Only a ``target``
    SQLite cannot open (not a database) is deleted, with its side files, and replaced by renaming.

    The caller must hold the folder's writer lock (:func:`saeforge.utils.locking.exclusive_lock`), so that no
    ``explain`` writes to ``target`` meanwhile.
    """
    built, target = Path(built), Path(target)
    if target.is_file():
        try:
            _copy_into(built, target)
            built.unlink()
            return target
        except sqlite3.OperationalError as err:
            if "locked" in str(err) or "busy" in str(err):
                raise SaeforgeError(f"{target} stayed locked by another process: {err}",
                                    "stop the process writing it (saeforge explain?) and harvest again") from err
        except sqlite3.DatabaseError:
            pass  # not a database, or damaged: replaced below
        _retire(target)
    for side in _sidecars(target):  # left by a store deleted by hand: they would be replayed onto the new file
        side.unlink(missing_ok=True)
    os.replace(built, target)
    return target


def _retire(target: Path) -> None:
    """Delete a store that cannot take a copy (damaged, or another page size), its log checkpointed first if SQLite
    still can, so nothing of it is replayed onto the file that replaces it."""
    with contextlib.suppress(sqlite3.Error):
        con = sqlite3.connect(target, timeout=5)
        try:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            con.close()
    target.unlink(missing_ok=True)


def _copy_into(built: Path, target: Path) -> None:
    src = sqlite3.connect(built)  # not mode=ro: a WAL-mode file opened read-only may need a -shm it cannot create
    dst = sqlite3.connect(target, timeout=60)
    try:
        dst.execute("PRAGMA journal_mode = WAL")  # a store from before WAL, or a half-finished one, is switched too
        src.backup(dst)
        dst.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        problems = [r[0] for r in dst.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"database disk image is malformed after the copy: {problems[:3]}")
    finally:
        src.close()
        dst.close()
