"""The flow-graph page in a real headless Chromium (see test_browser.py for the set-up) on a tiny harvested suite."""

from __future__ import annotations


import pytest

from tests.flow.conftest import tiny_suite  # noqa: F401  (the suite fixture, shared with tests/flow)

from .browser import launch, require_browser

TIMEOUT_MS = 20_000

CHROMIUM = require_browser()  # skips the module without a browser (fails under CI)

from playwright.sync_api import expect, sync_playwright  # noqa: E402  (after the check)


@pytest.fixture(scope="module")
def suite_server(tiny_suite):
    from saeforge.features.harvest import HarvestConfig, harvest
    from saeforge.web.app import create_app
    from saeforge.web.serve import BackgroundServer

    suite, corpus = tiny_suite
    if not (suite / "features.sqlite").exists():
        harvest(HarvestConfig(path=str(suite), corpus=str(corpus), tokens=32 * 16, batch_size=8, top_examples=3,
                              quantile_bins=2, examples_per_bin=1, random_examples=1, n_logits=3, n_neighbors=2,
                              device="cpu", progress=False))
    app = create_app(suite)
    with BackgroundServer(app) as srv:
        yield srv


def test_flow_page_draws_the_graph_and_links_to_feature_pages(suite_server, tiny_suite):
    from saeforge.flow.graph import build_flow_graph
    from saeforge.flow.suite import open_suite

    want = build_flow_graph(open_suite(tiny_suite[0]), "layers.2.resid_post:3", residual_threshold=0.0,
                            module_threshold=0.0)
    with sync_playwright() as p:
        browser = launch(p, CHROMIUM)
        try:
            page = browser.new_page(base_url=suite_server.url, viewport={"width": 1280, "height": 800})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto("/flow?feature=layers.2.resid_post:3&residual_threshold=0&module_threshold=0")
            nodes = page.locator("a.flow-node")
            expect(nodes).to_have_count(len(want.nodes))
            expect(page.locator("g.flow-edge")).to_have_count(len(want.edges))
            expect(page.locator('a.flow-node[data-role="target"]')).to_have_attribute(
                "data-node", "layers.2.resid_post:3")
            back = next(n for n in want.nodes if n.role == "backward")
            page.locator(f'a.flow-node[data-node="{back.id}"]').click()
            page.wait_for_url(f"**/saes/{back.site}/features/{back.idx}")
            expect(page.locator("#feature-idx")).to_have_text(str(back.idx))
            # an empty graph says so; a bad feature is a clear error
            page.goto("/flow?feature=layers.2.resid_post:3&residual_threshold=1&module_threshold=1")
            expect(page.locator("#flow-empty")).to_contain_text("is empty")
            resp = page.goto("/flow?feature=layers.2.resid_post:999")
            assert resp.status == 400
            expect(page.locator("body")).to_contain_text("out of range")
        finally:
            browser.close()
