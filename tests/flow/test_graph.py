import json

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.flow.graph import GraphConfig, build_flow_graph, run_graph
from saeforge.flow.links import link_rows, load_matches, predecessors, save_matches, successors
from saeforge.flow.matching import predecessor_matches
from saeforge.flow.suite import open_suite
from tests.flow.helpers import noisy, unit, write_suite

D, N = 512, 40  # wide enough that random directions stay far below the module threshold


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Layers 1-3; the chain R1:20 → R2:9 → R3:5 (cosines ≈ 0.9), M3:11 and A2:3 feeding it (≈ 0.55)."""
    g = torch.Generator().manual_seed(0)
    w = {f"layers.{L}.{k}": unit(N, D, g) for L in (1, 2, 3) for k in ("resid_post", "mlp_out", "attn_out")}
    w["layers.2.resid_post"][9] = noisy(w["layers.1.resid_post"][20:21], 0.45, g)[0]
    w["layers.3.resid_post"][5] = noisy(w["layers.2.resid_post"][9:10], 0.45, g)[0]
    w["layers.3.mlp_out"][11] = noisy(w["layers.3.resid_post"][5:6], 1.5, g)[0]
    w["layers.2.attn_out"][3] = noisy(w["layers.2.resid_post"][9:10], 1.5, g)[0]
    return write_suite(tmp_path_factory.mktemp("planted"), w)


def test_graph_follows_the_planted_chain_both_ways(planted):
    graph = build_flow_graph(open_suite(planted), "layers.2.resid_post:9")
    edges = {(e.src, e.dst, e.kind) for e in graph.edges}
    assert edges == {("layers.1.resid_post:20", "layers.2.resid_post:9", "R"),
                     ("layers.2.resid_post:9", "layers.3.resid_post:5", "R"),
                     ("layers.2.attn_out:3", "layers.2.resid_post:9", "A"),
                     ("layers.3.mlp_out:11", "layers.3.resid_post:5", "M")}
    assert all(e.weight > 0.85 for e in graph.edges if e.kind == "R")
    assert graph.span == (1, 3)
    roles = {n.id: n.role for n in graph.nodes}
    assert roles["layers.2.resid_post:9"] == "target" and roles["layers.1.resid_post:20"] == "backward"
    assert roles["layers.3.resid_post:5"] == "forward"


def test_thresholds_cut_the_graph(planted):
    suite = open_suite(planted)
    g = build_flow_graph(suite, "layers.2.resid_post:9", module_threshold=0.9)
    assert {e.kind for e in g.edges} == {"R"}
    empty = build_flow_graph(suite, "layers.2.resid_post:9", residual_threshold=0.99, module_threshold=0.99)
    assert empty.is_empty
    with pytest.raises(SaeforgeError, match="is empty.*best similarities: s\\^\\(R\\) to the layer before 0.9"):
        run_graph(GraphConfig(suite=str(planted), feature="layers.2.resid_post:9", residual_threshold=0.99,
                              module_threshold=0.99))


@pytest.mark.parametrize("kwargs, message", [
    (dict(feature="layers.2.resid_post:40"), "out of range"),
    (dict(feature="layers.2.resid_post"), "cannot read the feature"),
    (dict(feature="layers.2.mlp_out:3"), "start from a residual feature"),
    (dict(feature="layers.2.resid_post:1", residual_threshold=1.5), r"must lie in \[0, 1\]"),
    (dict(feature="layers.2.resid_post:1", module_threshold=-0.1), r"must lie in \[0, 1\]"),
])
def test_bad_input(planted, kwargs, message):
    with pytest.raises(SaeforgeError, match=message):
        run_graph(GraphConfig(suite=str(planted), **kwargs))


def test_exports(planted, tmp_path):
    run_graph(GraphConfig(suite=str(planted), feature="layers.2.resid_post:9", out=str(tmp_path)))
    data = json.loads((tmp_path / "layers.2.resid_post_9.json").read_text())
    assert data["target"] == "layers.2.resid_post:9" and len(data["edges"]) == 4
    dot = (tmp_path / "layers.2.resid_post_9.dot").read_text()
    assert '"layers.1.resid_post:20" -> "layers.2.resid_post:9"' in dot and dot.startswith("digraph")
    assert (tmp_path / "layers.2.resid_post_9.svg").read_text().lstrip().startswith("<?xml")
    assert (tmp_path / "layers.2.resid_post_9.png").read_bytes()[:4] == b"\x89PNG"


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
    assert rows[0][:5] == ("flow:topk", "layers.2.resid_post", int(m.indices[0, 0]), "layers.3.resid_post", 0)
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
