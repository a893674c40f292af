"""Feature flow across layers (Laptev, Balagansky, Aksenov, Gavrilov, ICML 2025, arXiv 2502.03032; docs/flow.md).

    from saeforge.flow import open_suite, match_decoders, build_flow_graph
    suite = open_suite("suite/")                                   # a run dir of per-site SAEs, or suite.json
    m = match_decoders(suite.sae(12, "resid_post").sae.W_dec, suite.sae(11, "resid_post").sae.W_dec, "top1")
    graph = build_flow_graph(suite, "layers.12.resid_post:123")    # backward and forward, thresholds 0.5 / 0.15
    graph.render("graph.svg")

Steps (each also a ``saeforge flow`` subcommand): suites (:mod:`.suite`), matching (:mod:`.matching`, results kept by
:mod:`.links`), flow graphs (:mod:`.graph`), origin groups (:mod:`.groups`), deactivation (:mod:`.deactivate`) and
multi-layer steering (:mod:`.steering`).
"""

from saeforge.flow.graph import FlowGraph, build_flow_graph
from saeforge.flow.links import link_kind, link_rows, load_matches, predecessors, save_matches, successors, \
    write_store_links
from saeforge.flow.matching import Matches, blocked_topk, compare_saes, match_decoders, pearson_match, \
    predecessor_matches
from saeforge.flow.suite import Suite, SuiteConfig, open_suite, suite_train_config, train_suite

__all__ = ["FlowGraph", "Matches", "Suite", "SuiteConfig", "blocked_topk", "build_flow_graph", "compare_saes",
           "link_kind", "link_rows", "load_matches", "match_decoders", "open_suite", "pearson_match",
           "predecessor_matches", "predecessors", "save_matches", "successors", "suite_train_config", "train_suite",
           "write_store_links"]
