"""The tree and module pages (saeforge.web.hierarchy): JSON endpoints, refusals, and the pages in a real headless
Chromium, on the app create_app makes (the navigation links to them when the run holds trees or modules)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TRAIN_SITES
from tests.hierarchy.conftest import hierarchy_run  # noqa: F401  (the fixture)
from tests.hierarchy.helpers import harvested_copy

from .browser import find_chromium, launch

pytest.importorskip("fastapi", reason="the dashboard needs the web extra")


@pytest.fixture(scope="module")
def tree_run(hierarchy_run, tiny_cache, tmp_path_factory):  # noqa: F811
    """The hierarchy run, harvested, with a post-hoc tree, both trees measured, explanations, and modules."""
    from saeforge.features.store import FeatureStore
    from saeforge.hierarchy.cli import LinkConfig, MetricsConfig, run_link, run_metrics
    from saeforge.hierarchy.modules import ModuleFinder, ModuleSettings, Task, evaluate_modules

    folder = tmp_path_factory.mktemp("tree_web")
    run = harvested_copy(hierarchy_run, folder)
    saes = run / "saes"
    run_link(LinkConfig(saes=(str(saes / "w16"), str(saes / "w64")), out=str(run / "trees" / "posthoc.json")))
    run_metrics(MetricsConfig(trees=(str(saes / "hsae"), str(run / "trees" / "posthoc.json")),
                              cache=str(tiny_cache.folder), tokens=2000, progress=False))
    from saeforge.hierarchy.tree import FeatureTree

    tree = FeatureTree.load(saes / "hsae" / "tree.json")
    parents, children = tree.pairs(0)
    parent, child = int(parents[0]), int(children[0])
    with FeatureStore(run / "features.sqlite") as store:
        store.set_explanation("hsae", parent, "names of kings", 0.7, "test")
        store.set_explanation("hsae", 16 + child, "the king of England", 0.6, "test")
    finder = ModuleFinder.from_run(run, settings=ModuleSettings(min_correlation=0.5, max_density=1.0),
                                   names=("w64", "l2"), device="cpu")
    task = Task("toy", {"r": {"discovery": ["{concept} is the question", "{concept}, that is"],
                              "evaluation": ["{concept} is"]}},
                {"To be": {"r": "the"}, "Now is": {"r": "of"}, "All the": {"r": "and"}})
    mods = finder.task_modules(task, list(task.concepts), ["r"])
    data = {"run": str(run), "task": "toy", "settings": finder.settings.__dict__,
            "sites": {str(k): v for k, v in finder.runner.sites.items()}, "saes": list(finder.names.values()),
            "concepts_used": list(task.concepts), "relations_used": ["r"], **mods}
    (run / "modules").mkdir()
    (run / "modules" / "toy.json").write_text(json.dumps(data))
    ev = evaluate_modules(finder, task, mods, list(task.concepts), ["r"])
    (run / "modules" / "toy.eval.json").write_text(json.dumps(ev))
    return run, parent, child


@pytest.fixture(scope="module")
def app(tree_run):
    from saeforge.web.app import create_app

    app = create_app(tree_run[0])
    return app


@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c


def test_index_lists_trees_and_modules(client):
    assert 'id="nav-hierarchy"' in client.get("/").text
    data = client.get("/api/hierarchy").json()
    trees = {t["name"]: t for t in data["trees"]}
    assert trees["hsae"]["kind"] == "hsae" and trees["hsae"]["widths"] == [16, 64] and trees["hsae"]["measured"]
    assert trees["posthoc"]["kind"] == "posthoc" and trees["posthoc"]["pairs"] == 64 - int(0.2 * 64)
    assert data["modules"][0]["name"] == "toy" and data["modules"][0]["evaluated"]


def test_tree_view_groups_children_under_parents_with_figures(client, tree_run):
    _, parent, child = tree_run
    view = client.get("/api/hierarchy/hsae", params={"order": "index", "limit": 100}).json()
    from saeforge.hierarchy.tree import FeatureTree

    tree = FeatureTree.load(tree_run[0] / "saes" / "hsae")
    assert view["parents_with_children"] == len(set(tree.pairs(0)[0].tolist()))
    rows = {p["idx"]: p for p in view["parents"]}
    assert {c["idx"] for c in rows[parent]["children"]} == set(tree.children(0, parent).tolist())
    assert rows[parent]["explanation"] == "names of kings" and rows[parent]["url"] == f"/saes/hsae/features/{parent}"
    kid = next(c for c in rows[parent]["children"] if c["idx"] == child)
    assert kid["explanation"] == "the king of England" and kid["url"] == f"/saes/hsae/features/{16 + child}"
    metrics = json.loads((tree_run[0] / "saes" / "hsae" / "tree.metrics.json").read_text())
    pair = metrics["per_pair"][0]
    i = pair["children"].index(child)
    assert kid["p_parent_given_child"] == pair["p_parent_given_child"][i] or pair["p_parent_given_child"][i] is None
    assert view["summary"]["tokens"] == 2000
    by_children = client.get("/api/hierarchy/hsae", params={"limit": 100}).json()["parents"]
    counts = [len(p["children"]) for p in by_children]
    assert counts == sorted(counts, reverse=True)


def test_refusals(client):
    assert client.get("/api/hierarchy/nope").status_code == 404
    r = client.get("/api/hierarchy/hsae", params={"level": 1})
    assert r.status_code == 404 and "has no children" in r.json()["error"]
    assert client.get("/api/hierarchy/hsae", params={"order": "random"}).status_code == 400
    assert client.get("/api/hierarchy/hsae", params={"limit": 1000}).status_code == 400
    assert client.get("/api/modules/nope").status_code == 404


def test_module_view(client, tree_run):
    data = client.get("/api/modules/toy").json()
    assert set(data["concepts"]) == {"To be", "Now is", "All the"} and data["evaluation"]["rows"]
    for layers in list(data["concepts"].values()) + list(data["relations"].values()):
        for layer in layers:
            assert layer["layer"] in (1, 2) and layer["site"] in TRAIN_SITES


# ---------------------------------------------------------------------------------------------------- browser
CHROMIUM = find_chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed: scripts/install_browser.sh")
def test_pages_in_a_browser(app, tree_run):
    from playwright.sync_api import expect, sync_playwright

    from saeforge.web.serve import BackgroundServer

    _, parent, child = tree_run
    with BackgroundServer(app) as srv, sync_playwright() as p:
        browser = launch(p, CHROMIUM)
        page = browser.new_page(base_url=srv.url, viewport={"width": 1280, "height": 900})
        page.set_default_timeout(20_000)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto("/hierarchy")
        page.click("#trees a:text-is('hsae')")
        page.wait_for_url("**/hierarchy/hsae")
        expect(page.locator("#tree-summary")).to_contain_text("P(parent | child)")
        page.select_option("select[name=order]", "index")
        page.click("form.search button")
        box = page.locator(f'.tree-parent[data-parent="{parent}"]')
        expect(box.locator(".head .expl")).to_have_text("names of kings")
        expect(box.locator(f'li[data-child="{child}"] .expl')).to_have_text("the king of England")
        box.locator(f'li[data-child="{child}"] a').first.click()
        page.wait_for_url(f"**/saes/hsae/features/{16 + child}")
        page.goto("/modules/toy")
        expect(page.locator("#module-evaluation tbody tr")).to_have_count(
            len(json.loads((tree_run[0] / "modules" / "toy.eval.json").read_text())["rows"]))
        expect(page.locator("section.module")).to_have_count(4)  # three concepts, one relation
        browser.close()
        assert not errors, errors
