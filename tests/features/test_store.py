"""FeatureStore: migrations from schema version 1 (a frozen copy of what version 1 wrote), links between features,
searches, and the reads the dashboard and steering use."""

from __future__ import annotations

import json
import math
import sqlite3

import numpy as np
import pytest

from saeforge.errors import SaeforgeError
from saeforge.features import store as store_module
from saeforge.features.store import SCHEMA_VERSION, FeatureStore

# The schema saeforge's version-1 stores have, copied here so that it stays what version 1 wrote whatever the code
# becomes. Do not edit.
V1_SCHEMA = """
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
D_SAE = 40


def _v1_store(path):
    """A version-1 store as saeforge 0.1 wrote it: two SAEs, contexts, vocab, features (some explained), examples."""
    rng = np.random.default_rng(0)
    con = sqlite3.connect(path)
    con.executescript(V1_SCHEMA)
    con.execute("INSERT INTO meta VALUES ('schema_version', '1'), ('model', '\"embedded\"'), ('n_tokens', '4096')")
    con.execute("INSERT INTO saes VALUES (1, 'a', 'layers.1.resid_post', ?, 'topk', '/x/a')", (D_SAE,))
    con.execute("INSERT INTO saes VALUES (2, 'b', 'layers.2.resid_post', ?, 'relu', '/x/b')", (D_SAE // 2,))
    con.executemany("INSERT INTO contexts VALUES (?, ?)",
                    [(i, rng.integers(0, 50, 16, dtype=np.int32).tobytes()) for i in range(8)])
    con.executemany("INSERT INTO vocab VALUES (?, ?)", [(i, f" w{i}") for i in range(50)])
    for sae_id, d in ((1, D_SAE), (2, D_SAE // 2)):
        for i in range(d):
            explained = sae_id == 1 and i % 7 == 0
            con.execute("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (
                sae_id, i, 0.01 * i, i, 1.0 + i, 0.5, json.dumps({"0.5": 0.4}), json.dumps({"edges": [0, 1],
                                                                                              "counts": [i]}),
                json.dumps([[f" w{i}", 3]]), None, None, json.dumps([[(i + 1) % d, 0.5]]),
                f"explanation {i}" if explained else None, 0.65 if explained and i else None,
                ("local:embedded | detection=0.650" if i else "openai:gpt-4o-mini") if explained else None,
                "2026-11-20T10:00:00" if explained else None))
            con.execute("INSERT INTO examples VALUES (?, ?, 'top', 0, ?, 2, 4, ?, ?)",
                        (sae_id, i, i % 8, 1.0 + i, np.linspace(0, 1, 8).astype(np.float16).tobytes()))
    con.commit()
    con.execute("PRAGMA journal_mode = WAL")
    con.close()
    return path


def _dump(path, tables=("meta", "saes", "contexts", "vocab", "features", "examples"), columns=None):
    con = sqlite3.connect(path)
    try:
        out = {}
        for t in tables:
            cols = columns.get(t, "*") if columns else "*"
            out[t] = con.execute(f"SELECT {cols} FROM {t} ORDER BY 1, 2").fetchall()
        return out
    finally:
        con.close()


V1_COLUMNS = {"saes": "id, name, site, d_sae, architecture, path",
              "features": "sae_id, idx, density, fire_count, max_act, mean_act, quantiles, histogram, top_tokens, "
                          "promoted, suppressed, neighbors, explanation, score, explainer, explained_at"}


def test_a_version_1_store_is_migrated_with_its_data_intact(tmp_path):
    path = _v1_store(tmp_path / "v1.sqlite")
    before = _dump(path, columns=V1_COLUMNS)
    with pytest.raises(SaeforgeError, match="older schema version 1") as err:  # read-only: not migrated
        FeatureStore(path, readonly=True)
    assert "open it writable once" in err.value.fix
    with FeatureStore(path) as s:
        assert s.meta("schema_version") == SCHEMA_VERSION == 2 and s.meta("migrated").startswith("1 -> 2")
        assert s.integrity_check() == "ok"
    after = _dump(path, columns=V1_COLUMNS)
    assert {k: v for k, v in after.items() if k != "meta"} == {k: v for k, v in before.items() if k != "meta"}
    assert set(before["meta"]) <= set(after["meta"]) | {("schema_version", "1")}
    # the new columns: who wrote each explanation, and the chance level of its score (balanced accuracy: 0.5)
    with FeatureStore(path, readonly=True) as s:
        assert s.integrity_check() == "ok"
        rec = s.feature("a", 7, with_examples=False)
        assert (rec["explainer_model"], rec["score_chance"], rec["explanation_source"]) == ("local:embedded", 0.5,
                                                                                            "llm")
        rec = s.feature("a", 0, with_examples=False)  # no score: no chance level
        assert (rec["explainer_model"], rec["score_chance"]) == ("openai:gpt-4o-mini", None)
        assert s.feature("a", 1, with_examples=False)["explainer_model"] is None
        assert s.saes()[0]["weights_hash"] is None
        assert s.examples("a", 3)[0]["acts"] == pytest.approx(np.linspace(0, 1, 8), abs=1e-3)
        assert s.explained("a") == {0, 7, 14, 21, 28, 35}
        migrated_schema = s.schema()
    # the same schema as a store made now
    with FeatureStore(tmp_path / "new.sqlite", create=True) as fresh:
        assert fresh.schema() == migrated_schema
    with FeatureStore(path) as s:  # and it takes links
        assert s.add_links("flow", "a", "b", [(1, 2, 0.5)]) == 1


def test_a_failed_migration_leaves_the_version_1_store_as_it_was(tmp_path, monkeypatch):
    path = _v1_store(tmp_path / "v1.sqlite")
    before = _dump(path)
    steps = dict(store_module.SCHEMA_STEPS)
    steps[2] = (*steps[2], "ALTER TABLE no_such_table ADD COLUMN x TEXT")  # fails after every other step of 2
    monkeypatch.setattr(store_module, "SCHEMA_STEPS", steps)
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        FeatureStore(path)
    assert _dump(path) == before
    con = sqlite3.connect(path)
    assert "weights_hash" not in [r[1] for r in con.execute("PRAGMA table_info(saes)")]
    assert con.execute("SELECT name FROM sqlite_master WHERE name = 'links'").fetchone() is None
    con.close()
    monkeypatch.undo()
    with FeatureStore(path) as s:  # the real migration still works afterwards
        assert s.meta("schema_version") == 2 and s.integrity_check() == "ok"


@pytest.mark.parametrize("version, message", [(3, "schema version 3, newer than this saeforge reads"),
                                              (0, "older than any saeforge wrote")])
def test_other_versions_are_refused(tmp_path, version, message):
    path = _v1_store(tmp_path / "v.sqlite")
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    con.commit()
    con.close()
    for kw in ({}, {"readonly": True}) if version else ({},):
        with pytest.raises(SaeforgeError, match=message):
            FeatureStore(path, **kw)
    with pytest.raises(SaeforgeError, match=message):
        FeatureStore.ensure_current(path)


def test_ensure_current_migrates_and_refuses_what_is_not_a_store(tmp_path):
    path = _v1_store(tmp_path / "v1.sqlite")
    FeatureStore.ensure_current(path)
    with FeatureStore(path, readonly=True) as s:
        assert s.meta("schema_version") == SCHEMA_VERSION
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(SaeforgeError, match="not a readable feature store"):
        FeatureStore.ensure_current(junk)


# ------------------------------------------------------------------------------------------------ links
@pytest.fixture
def two_saes(tmp_path):
    path = _v1_store(tmp_path / "s.sqlite")
    with FeatureStore(path) as s:
        yield s


def test_links_both_ways_replace_by_kind_and_pair(two_saes):
    s = two_saes
    flow = [(1, 2, 0.9, {"layer_gap": 1}), (1, 3, -0.95), (4, 2, 0.2), (1, 5)]
    assert s.add_links("flow", "a", "b", flow) == 4
    assert s.add_links("parent", "a", "a", [(1, 9, 1.0), (9, 10, 1.0)]) == 2
    out = s.successors("a", 1)
    assert [(link["kind"], link["dst_sae"], link["dst_idx"], link["weight"]) for link in out] == [
        ("parent", "a", 9, 1.0), ("flow", "b", 3, -0.95), ("flow", "b", 2, 0.9), ("flow", "b", 5, None)]
    assert out[2]["data"] == {"layer_gap": 1} and out[1]["data"] is None
    assert [link["dst_idx"] for link in s.successors("a", 1, kind="flow", limit=2)] == [3, 2]
    assert [link["dst_idx"] for link in s.successors("a", 1, other_sae="a")] == [9]
    assert [(link["src_sae"], link["src_idx"]) for link in s.predecessors("b", 2)] == [("a", 1), ("a", 4)]
    assert [link["src_idx"] for link in s.predecessors("a", 9, kind="parent")] == [1]
    assert s.predecessors("b", 7) == []
    # a re-run of the flow analysis replaces its links between these two SAEs, and nothing else
    assert s.replace_links("flow", "a", "b", [(0, 0, 0.1)]) == 1
    assert [(link["src_idx"], link["dst_idx"]) for link in s.links_between("flow", "a", "b")] == [(0, 0)]
    assert len(s.links_between("parent", "a", "a")) == 2
    assert s.link_summary() == [{"kind": "flow", "src_sae": "a", "dst_sae": "b", "n": 1},
                                {"kind": "parent", "src_sae": "a", "dst_sae": "a", "n": 2}]
    assert s.delete_links("parent") == 2 and s.link_summary()[0]["kind"] == "flow"


@pytest.mark.parametrize("rows, message", [
    ([(0, 1, 0.5), (D_SAE, 1, 0.5)], "out of range"),  # a has D_SAE features
    ([(0, D_SAE // 2, 0.5)], "out of range"),  # b has D_SAE // 2
    ([(0, 1, math.nan)], "weight nan"),
    ([(0, 1, 0.5), (1,)], "1 fields"),
])
def test_bad_links_write_nothing(two_saes, rows, message):
    s = two_saes
    s.add_links("flow", "a", "b", [(7, 7, 1.0)])
    with pytest.raises(SaeforgeError, match=message):
        s.replace_links("flow", "a", "b", rows)
    assert [(link["src_idx"], link["dst_idx"]) for link in s.links_between("flow", "a", "b")] == [(7, 7)]
    with pytest.raises(SaeforgeError, match="no SAE named 'c'"):
        s.add_links("flow", "a", "c", [(0, 0)])
    with pytest.raises(SaeforgeError, match="not a name"):
        s.add_links("", "a", "b", [(0, 0)])
    with pytest.raises(SaeforgeError, match="out of range"):
        s.successors("a", D_SAE)


# ------------------------------------------------------------------------------------------------ reads
def test_max_activations_is_zero_where_there_is_no_record(two_saes):
    s = two_saes
    m = s.max_activations("a")
    assert m.dtype == np.float32 and m.shape == (D_SAE,)
    assert m.tolist() == pytest.approx([1.0 + i for i in range(D_SAE)])
    s.con.execute("DELETE FROM features WHERE sae_id = 2 AND idx IN (3, 5)")  # records lost: 0, not an error
    m = s.max_activations("b")
    assert m[3] == 0 and m[5] == 0 and m[4] == 5.0 and m.shape == (D_SAE // 2,)


def _search_store(path):
    """Features whose top tokens hold characters a LIKE pattern or JSON text would misread."""
    tokens = {0: [[",", 40], [" the", 10]], 1: [[" the", 60], [",", 5]], 2: [["%", 3]], 3: [["_", 2]],
              4: [["[", 1], ["]", 1]], 5: [[" lord", 7], ["the", 2]], 6: [["\"", 9]], 7: [], 8: [[" the", 1]]}
    s = FeatureStore(path, create=True)
    sae_id = s.add_sae("x", "layers.0.resid_post", 10, "topk", "/x")
    s.add_features(sae_id, [{"idx": i, "density": 0.01 * (10 - i) if i != 7 else 0.0,
                             "fire_count": {1: 60, 8: 1}.get(i, 0 if i == 7 else 100), "max_act": 1.0,
                             "mean_act": 0.5, "quantiles": None, "histogram": None, "top_tokens": tokens.get(i, []),
                             "promoted": None, "suppressed": None, "neighbors": None} for i in range(10)])
    s.commit()
    return s


def test_token_search_is_exact_and_ranked_by_relevance(tmp_path):
    s = _search_store(tmp_path / "search.sqlite")
    idx = lambda **kw: [r["idx"] for r in s.list_features("x", limit=100, **kw)]  # noqa: E731
    assert idx(token=",", order="index") == [0, 1]
    for special in ("%", "_", "[", "]", "\""):  # no wildcard, no JSON syntax matches everything
        assert len(idx(token=special)) == 1
    assert idx(token="%") == [2] and idx(token="_") == [3] and idx(token="\"") == [6]
    assert idx(token="zzz") == [] and idx(token="\\") == []
    # spaces around the query are ignored unless typed: "the" finds " the" and "the"
    assert sorted(idx(token="the")) == [0, 1, 5, 8] and sorted(idx(token=" the")) == [0, 1, 8]
    # relevance: the token's share of the feature's top activations, hits / (min(100, fire count) + 10), then hits:
    # 60/70 first; feature 8 fired once, on " the" (1/11), ties with 10 of 100 (10/110) and has fewer hits
    rows = s.list_features("x", token=" the", order="relevance")
    assert [(r["idx"], r["token_hits"], r["token_rank"]) for r in rows] == [(1, 60, 0), (0, 10, 1), (8, 1, 0)]
    assert [r["token_relevance"] for r in rows] == pytest.approx([60 / 70, 10 / 110, 1 / 11])
    assert s.count_features("x", token=" the") == 3 and s.count_features("x", token="%") == 1
    # density both ways, dead features hidden on request
    assert idx(order="density_asc")[:2] == [7, 9] and idx(order="density")[0] == 0
    assert 7 not in idx(alive_only=True) and s.count_features("x", alive_only=True) == 9
    assert s.count_dead("x") == 1
    with pytest.raises(SaeforgeError, match="the limit is 200"):
        s.list_features("x", token="a" * 201)
    with pytest.raises(SaeforgeError, match="unknown order"):
        s.list_features("x", order="random")
    s.close()


def test_explanation_search_has_no_wildcards(tmp_path):
    s = _search_store(tmp_path / "search.sqlite")
    s.set_explanation("x", 0, "100% of commas", 0.7, "test")
    s.set_explanation("x", 1, "snake_case names", 0.6, "test")
    s.set_explanation("x", 2, "plain words", 0.5, "test")
    assert [r["idx"] for r in s.list_features("x", query="%")] == [0]
    assert [r["idx"] for r in s.list_features("x", query="_")] == [1]
    assert [r["idx"] for r in s.list_features("x", query="PLAIN")] == [2]
    assert s.brief_features("x", [0, 2, 99]) == {
        0: {"density": 0.1, "explanation": "100% of commas", "score": 0.7, "top_tokens": [[",", 40], [" the", 10]]},
        2: {"density": 0.08, "explanation": "plain words", "score": 0.5, "top_tokens": [["%", 3]]}}
    assert s.count_explained("x") == 3
    s.close()


def test_no_sql_outside_the_store():
    """FeatureStore owns every SQL statement: any other module that queries the store directly would bypass its
    schema migrations and its read-only and locking rules."""
    import re
    from pathlib import Path

    import saeforge

    root = Path(saeforge.__file__).parent
    sql = re.compile(r"\.execute(many)?\(|\b(SELECT|INSERT INTO|DELETE FROM|UPDATE \w+ SET)\b")
    offenders = [f"{p.relative_to(root)}:{n}" for p in sorted(root.rglob("*.py")) if p.name != "store.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if sql.search(line)]
    assert offenders == []
