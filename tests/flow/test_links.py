import pytest

from saeforge.flow.links import link_rows, load_matches, predecessors, save_matches, successors
from saeforge.flow.matching import predecessor_matches
from saeforge.flow.suite import open_suite


def test_stored_links_answer_predecessors_and_successors(planted, tmp_path):
    suite = open_suite(planted)
    for m in predecessor_matches(suite, 3, "topk", k=3).values():
        save_matches(tmp_path, m)
    m = load_matches(tmp_path, "layers.3.resid_post", "layers.2.resid_post", "topk")
    assert m is not None and m.k == 3
    preds = predecessors(tmp_path, "layers.3.resid_post", 5, "topk")
    best = {p["sae"]: p["idx"] for p in preds if p["rank"] == 0}
    assert set(best) == {"layers.2.resid_post", "layers.3.mlp_out", "layers.3.attn_out"}
    assert best["layers.2.resid_post"] == 9 and best["layers.3.mlp_out"] == 11
    succ = successors(tmp_path, "layers.2.resid_post", 9, "topk")
    assert succ[0] == {"sae": "layers.3.resid_post", "idx": 5, "weight": pytest.approx(preds[0]["weight"]),
                       "rank": 0}
    rows = list(link_rows(m))
    assert rows[0] == (int(m.indices[0, 0]), 0, pytest.approx(float(m.scores[0, 0])), {"rank": 0})
    assert len(rows) == int((m.indices >= 0).sum())  # a missing match (-1) is no link
    assert load_matches(tmp_path, "layers.3.resid_post", "layers.2.resid_post", "top1") is None


def test_a_table_that_fails_to_write_leaves_nothing_half_written(planted, tmp_path, monkeypatch):
    import safetensors.torch

    from saeforge.flow.links import matches_folder, stored_tables

    suite = open_suite(planted)
    first, second = list(predecessor_matches(suite, 3, "top1").values())[:2]
    save_matches(tmp_path, first)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process were stopped while writing

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save_matches(tmp_path, second)
    monkeypatch.undo()
    assert [t["b"] for t in stored_tables(tmp_path)] == [first.b]  # the index lists only the complete table
    assert sorted(p.name for p in matches_folder(tmp_path).iterdir()) == sorted(
        ["links.json", f"{first.a}__{first.b}__top1.safetensors"])  # no partial file left behind
    assert load_matches(tmp_path, second.a, second.b, "top1") is None


# ------------------------------------------------------------------------------------------------ the feature store
def _suite_with_store(planted, tmp_path, leave_out=()):
    """A copy of the planted suite with a feature store that holds its SAEs (no harvest needed for links)."""
    import shutil

    from saeforge.features.store import STORE_FILE, FeatureStore

    suite = tmp_path / "suite"
    shutil.copytree(planted, suite)
    with FeatureStore(suite / STORE_FILE, create=True) as store:
        for site, e in open_suite(suite).saes.items():
            if site not in leave_out:
                store.add_sae(site, site, e.d_sae, "topk", str(e.path))
        store.commit()
    return suite, suite / STORE_FILE


def test_flow_match_writes_the_matches_into_the_feature_store(planted, tmp_path, capsys):
    from saeforge.features.store import FeatureStore
    from saeforge.flow.cli import MatchConfig, run_match

    suite, store_path = _suite_with_store(planted, tmp_path)
    summary = run_match(MatchConfig(suite=str(suite), methods=("top1", "topk"), k=3))
    assert "links of 12 tables written" in capsys.readouterr().out  # layers 2 and 3 × R, M, A × two methods
    with FeatureStore(store_path, readonly=True) as store:
        preds = {(p["src_sae"], p["src_idx"]) for p in store.predecessors("layers.3.resid_post", 5, kind="flow:top1")}
        assert preds == {(p["sae"], p["idx"]) for p in predecessors(suite, "layers.3.resid_post", 5)}
        assert {("layers.2.resid_post", 9), ("layers.3.mlp_out", 11)} <= preds  # the planted chain
        succ = store.successors("layers.2.resid_post", 9, kind="flow:top1", other_sae="layers.3.resid_post")
        assert [(s["dst_idx"], round(s["weight"], 5)) for s in succ] == [
            (s["idx"], round(s["weight"], 5)) for s in successors(suite, "layers.2.resid_post", 9)]
        assert succ[0]["dst_idx"] == 5 and succ[0]["weight"] > 0.85  # the planted successor first
        top1 = store.links_between("flow:top1", "layers.2.resid_post", "layers.3.resid_post")
        assert [link["dst_idx"] for link in top1] == sorted(range(40), key=lambda i: (
            int(load_matches(suite, "layers.3.resid_post", "layers.2.resid_post", "top1").top1[i]), i))
        topk = load_matches(suite, "layers.3.resid_post", "layers.3.attn_out", "topk")
        assert len(store.links_between("flow:topk", "layers.3.attn_out", "layers.3.resid_post")) == int(
            (topk.indices >= 0).sum())
        n = sum(r["n"] for r in store.link_summary())
    assert summary["store_links"]["links"] == n
    run_match(MatchConfig(suite=str(suite), methods=("top1", "topk"), k=3))  # a re-run replaces, never duplicates
    with FeatureStore(store_path, readonly=True) as store:
        assert sum(r["n"] for r in store.link_summary()) == n


def test_tables_whose_saes_the_store_lacks_are_skipped_and_the_option_turns_it_off(planted, tmp_path, capsys):
    from saeforge.features.store import FeatureStore
    from saeforge.flow.cli import MatchConfig, run_match

    suite, store_path = _suite_with_store(planted, tmp_path, leave_out=("layers.3.mlp_out",))
    run_match(MatchConfig(suite=str(suite), methods=("top1",)))
    assert "skipped 1 table(s) whose SAEs it does not hold" in capsys.readouterr().out
    with FeatureStore(store_path, readonly=True) as store:
        assert {(r["src_sae"], r["dst_sae"]) for r in store.link_summary()} == {
            ("layers.1.resid_post", "layers.2.resid_post"), ("layers.2.mlp_out", "layers.2.resid_post"),
            ("layers.2.attn_out", "layers.2.resid_post"), ("layers.2.resid_post", "layers.3.resid_post"),
            ("layers.3.attn_out", "layers.3.resid_post")}
    suite2, store2 = _suite_with_store(planted, tmp_path / "off")
    run_match(MatchConfig(suite=str(suite2), methods=("top1",), store_links=False))
    with FeatureStore(store2, readonly=True) as store:
        assert store.link_summary() == []
    assert load_matches(suite2, "layers.3.resid_post", "layers.2.resid_post", "top1") is not None


def test_a_killed_store_write_leaves_the_previous_links(planted, tmp_path, monkeypatch):
    import saeforge.flow.links as links
    from saeforge.features.store import FeatureStore

    suite, store_path = _suite_with_store(planted, tmp_path)
    first = predecessor_matches(open_suite(suite), 3, "topk", k=3)["R"]
    links.write_store_links(store_path, [first])
    with FeatureStore(store_path, readonly=True) as store:
        before = store.links_between("flow:topk", first.b, first.a)
    real = links.link_rows

    def killed(m):
        for n, row in enumerate(real(m)):
            if n == 20:
                raise KeyboardInterrupt  # as if the process were stopped in the middle of the table
            yield row

    monkeypatch.setattr(links, "link_rows", killed)
    second = predecessor_matches(open_suite(suite), 3, "topk", k=2)["R"]  # a different table of the same kind
    with pytest.raises(KeyboardInterrupt):
        links.write_store_links(store_path, [second])
    with FeatureStore(store_path, readonly=True) as store:
        assert store.links_between("flow:topk", first.b, first.a) == before and len(before) > 20


def test_flow_match_refuses_while_the_store_is_being_written(planted, tmp_path):
    from saeforge.errors import SaeforgeError
    from saeforge.features.store import WRITER_LOCK
    from saeforge.flow.cli import MatchConfig, run_match
    from saeforge.utils.locking import exclusive_lock

    suite, _ = _suite_with_store(planted, tmp_path)
    with exclusive_lock(suite, WRITER_LOCK):  # as saeforge harvest or explain hold it
        with pytest.raises(SaeforgeError, match="in use"):
            run_match(MatchConfig(suite=str(suite), methods=("top1",)))
    assert load_matches(suite, "layers.3.resid_post", "layers.2.resid_post", "top1") is None  # refused before work


def test_flow_links_lists_predecessors_and_successors_and_syncs_the_store(planted, tmp_path, capsys):
    from saeforge.cli import main
    from saeforge.features.store import FeatureStore

    suite, store_path = _suite_with_store(planted, tmp_path)
    assert main(["flow", "links", str(suite), "--feature", "layers.2.resid_post:9"]) == 2
    assert "no top1 match tables" in capsys.readouterr().err  # nothing matched yet: says which command to run
    assert main(["flow", "match", str(suite), "--methods", "top1", "--nostore-links"]) == 0
    capsys.readouterr()
    assert main(["flow", "links", str(suite), "--feature", "layers.2.resid_post:9", "--limit", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "layers.2.resid_post:9"
    preds = out[out.index("  predecessors (top1):") + 1:out.index("  successors (top1):")]
    assert [p.split()[0] for p in preds][:2] == ["layers.1.resid_post:20", "layers.2.attn_out:3"]  # best first
    assert len(preds) == 3 and preds[2].startswith("    layers.2.mlp_out:")
    assert out[-1].split()[0] == "layers.3.resid_post:5" and len(out) == 7  # --limit 1: the best successor only
    with FeatureStore(store_path, readonly=True) as store:
        assert store.link_summary() == []  # --nostore-links
    assert main(["flow", "links", str(suite), "--sync"]) == 0
    assert "links of 6 tables written" in capsys.readouterr().out
    with FeatureStore(store_path, readonly=True) as store:
        assert store.predecessors("layers.3.resid_post", 5, other_sae="layers.2.resid_post")[0]["src_idx"] == 9
    for argv, message in ((["--feature", "layers.2.resid_post:40"], "out of range"),
                          (["--feature", "layers.2.resid_post:1", "--method", "cosine"], "unknown matching method"),
                          ([], "no feature given")):
        assert main(["flow", "links", str(suite), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "fix:" in err


def test_flow_match_migrates_a_store_from_before_the_links_table(planted, tmp_path):
    import shutil
    import sqlite3

    from saeforge.features.store import SCHEMA_VERSION, STORE_FILE, FeatureStore
    from saeforge.flow.cli import MatchConfig, run_match
    from tests.features.test_store import V1_SCHEMA

    suite = tmp_path / "suite"
    shutil.copytree(planted, suite)
    con = sqlite3.connect(suite / STORE_FILE)  # what saeforge wrote before schema 2: no links table
    con.executescript(V1_SCHEMA)
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.executemany("INSERT INTO saes (name, site, d_sae, architecture, path) VALUES (?, ?, 40, 'topk', '')",
                    [(s, s) for s in open_suite(suite).saes])
    con.commit()
    con.close()
    run_match(MatchConfig(suite=str(suite), methods=("top1",), layers="3"))
    with FeatureStore(suite / STORE_FILE, readonly=True) as store:
        assert store.meta("schema_version") == SCHEMA_VERSION
        assert {r["src_sae"]: r["n"] for r in store.link_summary()} == {
            "layers.2.resid_post": 40, "layers.3.mlp_out": 40, "layers.3.attn_out": 40}
