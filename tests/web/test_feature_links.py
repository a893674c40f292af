"""A feature page shows the feature's links across layers (written into the store by ``saeforge flow match``)."""

from __future__ import annotations

import shutil

import pytest

from tests.flow.conftest import tiny_suite  # noqa: F401  (the suite fixture, shared with tests/flow)


@pytest.fixture(scope="module")
def matched_suite(tiny_suite, tmp_path_factory):  # noqa: F811
    from saeforge.features.harvest import HarvestConfig, harvest
    from saeforge.flow.cli import MatchConfig, run_match

    src, corpus = tiny_suite
    suite = tmp_path_factory.mktemp("linked") / "suite"
    shutil.copytree(src, suite, ignore=shutil.ignore_patterns("checkpoints", "features.sqlite*", "flow"))
    harvest(HarvestConfig(path=str(suite), corpus=str(corpus), tokens=32 * 16, batch_size=8, top_examples=3,
                          quantile_bins=2, examples_per_bin=1, random_examples=1, n_logits=3, n_neighbors=2,
                          device="cpu", progress=False))
    run_match(MatchConfig(suite=str(suite), methods=("top1", "topk"), k=3))
    return suite


@pytest.fixture(scope="module")
def client(matched_suite):
    from fastapi.testclient import TestClient

    from saeforge.web.app import create_app

    with TestClient(create_app(matched_suite)) as c:
        yield c


def test_feature_page_lists_predecessors_and_successors(matched_suite, client):
    from saeforge.flow.links import predecessors

    want = predecessors(matched_suite, "layers.2.resid_post", 3)
    rec = client.get("/api/saes/layers.2.resid_post/features/3").json()
    groups = {(g["kind"], g["direction"]): g["links"] for g in rec["links"]}
    assert set(groups) == {("flow:top1", "in"), ("flow:topk", "in")}  # the last layer of the suite: no successor
    assert [(x["sae"], x["idx"]) for x in groups[("flow:top1", "in")]] == [(w["sae"], w["idx"]) for w in want]
    assert [x["weight"] for x in groups[("flow:top1", "in")]] == pytest.approx([w["weight"] for w in want])
    assert len(groups[("flow:topk", "in")]) == 8  # 3 sites × top 3 = 9 stored, the strongest 8 shown
    html = client.get("/saes/layers.2.resid_post/features/3").text
    for w in want:
        assert f'href="/saes/{w["sae"]}/features/{w["idx"]}" class="feature-link"' in html
    assert 'href="/flow?feature=layers.2.resid_post:3" id="flow-graph-link"' in html

    back = next(w for w in want if w["sae"] == "layers.1.resid_post")  # its residual predecessor has it as successor
    rec = client.get(f"/api/saes/layers.1.resid_post/features/{back['idx']}").json()
    out = {(g["kind"], g["direction"]): g["links"] for g in rec["links"]}[("flow:top1", "out")]
    assert ("layers.2.resid_post", 3) in {(x["sae"], x["idx"]) for x in out}
    assert all("explanation" in x and "top_tokens" in x for x in out)
    # an attention feature is only ever a predecessor; its page has no flow-graph link (graphs start at residuals)
    rec = client.get("/api/saes/layers.2.attn_out/features/0").json()
    assert all(g["direction"] == "out" for g in rec["links"])
    assert 'id="flow-graph-link"' not in client.get("/saes/layers.2.attn_out/features/0").text
