"""The circuit pages (saeforge.web.circuits): the list, the graph with nodes linked to feature pages and labelled from
the store, the JSON endpoints, refusals, and the graph in a real headless Chromium."""

from __future__ import annotations

import json
import shutil

import pytest

from .browser import find_chromium, launch
from .conftest import SAE

pytest.importorskip("fastapi", reason="the dashboard needs the web extra")


@pytest.fixture
def circuit_run(web_run, tmp_path):
    """A copy of the dashboard's run with one circuit over its SAE: two features, the error node, edges to the metric,
    and a damaged circuit file beside it."""
    from saeforge.circuits.circuit import Circuit, write_circuit
    from saeforge.features.store import FeatureStore

    run = tmp_path / "run"
    shutil.copytree(web_run[0], run)
    roles = web_run[1]
    with FeatureStore(run / "features.sqlite", readonly=True) as store:
        d_sae = store.sae(SAE)["d_sae"]
    busy, third = roles["busy"], roles["third"]
    circuit = Circuit("toy-task", [SAE], {SAE: d_sae}, {SAE: [busy, third, d_sae]}, {SAE: [0.8, -0.3, 1.5]},
                      [{"from": [SAE, busy], "to": ["logits", 0], "effect": 0.7},
                       {"from": [SAE, "error"], "to": ["logits", 0], "effect": 1.4}],
                      evaluation={"faithfulness": 0.62, "completeness": 0.1, "random_faithfulness_mean": 0.4})
    write_circuit(circuit, run / "circuits" / "toy")
    (run / "circuits" / "broken").mkdir()
    (run / "circuits" / "broken" / "circuit.json").write_text("{not json")
    return run, busy, third


@pytest.fixture
def client(circuit_run):
    from fastapi.testclient import TestClient

    from saeforge.web.app import create_app

    with TestClient(create_app(circuit_run[0])) as c:
        yield c


def test_the_list_and_the_json(client, circuit_run):
    _, busy, third = circuit_run
    assert 'id="nav-circuits"' in client.get("/").text
    listed = {c["name"]: c for c in client.get("/api/circuits").json()}
    assert listed["toy"]["nodes"] == 3 and listed["toy"]["features"] == 2 and listed["toy"]["faithfulness"] == 0.62
    assert "cannot be read" in listed["broken"]["error"]  # a damaged file is named, the others still listed
    data = client.get("/api/circuits/toy").json()
    assert data["format"] == "saeforge-circuit" and {n["node"] for n in data["nodes"]} == {busy, third, "error"}
    html = client.get("/circuits").text
    assert 'href="/circuits/toy"' in html and "0.62" in html


def test_the_graph_links_features_to_their_pages_with_store_labels(client, circuit_run):
    from saeforge.features.store import FeatureStore

    run, busy, third = circuit_run
    html = client.get("/circuits/toy").text
    assert f'href="/saes/{SAE}/features/{busy}"' in html and f'href="/saes/{SAE}/features/{third}"' in html
    assert 'data-node="error"' in html and html.count('class="circuit-edge"') == 2
    with FeatureStore(run / "features.sqlite", readonly=True) as store:
        expl = store.brief_features(SAE, [busy])[busy]["explanation"]
    assert expl and expl in html  # the busy feature is explained in the dashboard's run
    assert "+0.8" in html and "-0.3" in html  # effects with their signs


@pytest.mark.parametrize("name", ["nope", "..", "broken%2F..%2F..%2Ffeatures.sqlite"])
def test_unknown_names_are_404_and_damaged_files_say_so(client, name):
    assert client.get(f"/api/circuits/{name}").status_code == 404
    r = client.get("/api/circuits/broken")
    assert r.status_code == 500 and "cannot be read as a circuit" in r.json()["error"]


CHROMIUM = find_chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed: scripts/install_browser.sh")
def test_the_graph_in_a_browser(circuit_run):
    from playwright.sync_api import expect, sync_playwright

    from saeforge.web.app import create_app
    from saeforge.web.serve import BackgroundServer

    run, busy, _ = circuit_run
    with BackgroundServer(create_app(run)) as srv, sync_playwright() as p:
        browser = launch(p, CHROMIUM)
        page = browser.new_page(base_url=srv.url, viewport={"width": 1280, "height": 900})
        page.set_default_timeout(20_000)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto("/")
        page.click("#nav-circuits")
        page.click("#circuit-list a:text-is('toy')")
        page.wait_for_url("**/circuits/toy")
        expect(page.locator("#circuit-faithfulness")).to_have_text("0.62")
        expect(page.locator(".circuit-node")).to_have_count(3)
        page.locator(f'a.circuit-node[data-node="{busy}"]').click()
        page.wait_for_url(f"**/saes/{SAE}/features/{busy}")
        browser.close()
        assert not errors, errors
    assert json.loads((run / "circuits" / "toy" / "circuit.json").read_text())["task"] == "toy-task"
