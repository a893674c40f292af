import json

import pytest

from saeforge.errors import SaeforgeError
from saeforge.flow.graph import GraphConfig, build_flow_graph, run_graph
from saeforge.flow.suite import open_suite


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
