"""The dashboard end to end in a real headless Chromium (Debian's ``chromium``, driven by Playwright) against a
uvicorn server on 127.0.0.1. ``scripts/install_browser.sh`` installs both; without chromium these tests skip, except
under CI (``CI`` set), where a missing browser is a failure rather than a silent skip."""

from __future__ import annotations

import json
import os

import pytest

from .browser import find_chromium, launch
from .conftest import EXPLANATIONS, SAE

TIMEOUT_MS = 20_000


def _missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the browser tests: scripts/install_browser.sh installs it)")
    pytest.skip(f"{reason}: run scripts/install_browser.sh", allow_module_level=True)


try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    _missing("Playwright for Python is not installed")
CHROMIUM = find_chromium()
if CHROMIUM is None:
    _missing("Debian's chromium is not installed")


@pytest.fixture(scope="module")
def server(web_run):
    from saeforge.web.app import create_app
    from saeforge.web.serve import BackgroundServer

    with BackgroundServer(create_app(web_run[0], max_prompt_chars=2000)) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = launch(p, CHROMIUM)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    pg.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
          if msg.type == "error" and "status of 4" not in msg.text else None)
    yield pg
    context.close()
    assert not problems, problems  # no JavaScript errors on any page


def test_overview_shows_the_metrics_and_plots(page, web_run):
    from saeforge.web.app import fmt

    ev = json.loads((web_run[0] / "eval.json").read_text())["saes"][SAE]
    page.goto("/")
    sae = page.locator(f'section.sae[data-sae="{SAE}"]')
    for key in ("fvu", "l0", "ce_recovered", "kl_div"):
        expect(sae.locator(f'tr[data-metric="{key}"] td')).to_have_text(fmt(ev[key]))
    images = sae.locator(".plots img")
    expect(images).to_have_count(4)  # eval's three plots and harvest's activation heat map
    for i in range(4):  # each plot actually loaded and decoded
        images.nth(i).scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=images.nth(i).element_handle())


def test_search_by_explanation_and_by_token_then_open_a_feature(page, web_run):
    _, roles = web_run
    page.goto("/")
    page.click("#nav-features")
    expect(page.locator("#feature-table tbody tr")).to_have_count(50)
    page.fill("#q", "punctuation")
    page.click("#search button[type=submit]")
    rows = page.locator("#feature-table tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-idx", str(roles["busy"]))
    expect(rows.first).to_contain_text(EXPLANATIONS["busy"])

    page.fill("#q", "")
    page.fill("#token", "zzzz-no-such-token")
    page.click("#search button[type=submit]")
    expect(page.locator("#no-results")).to_be_visible()

    token = page.request.get(f"/api/saes/{SAE}/features/{roles['busy']}").json()["top_tokens"][0][0]
    expected = page.request.get(f"/api/saes/{SAE}/features", params={"token": token, "limit": 50}).json()
    page.fill("#token", token)
    page.click("#search button[type=submit]")
    shown = page.locator("#feature-table tbody tr")
    expect(shown).to_have_count(len(expected["features"]))
    assert [int(i) for i in shown.evaluate_all("rows => rows.map(r => r.dataset.idx)")] == \
           [f["idx"] for f in expected["features"]]

    page.click(f'#feature-table tr[data-idx="{roles["busy"]}"] a')
    page.wait_for_url(f"**/saes/{SAE}/features/{roles['busy']}")
    expect(page.locator("#feature-idx")).to_have_text(str(roles["busy"]))


def test_feature_page_highlights_tokens_and_links_neighbours(page, web_run):
    idx = web_run[1]["busy"]
    data = page.request.get(f"/api/saes/{SAE}/features/{idx}").json()
    page.goto(f"/saes/{SAE}/features/{idx}")
    expect(page.locator("#explanation")).to_contain_text(EXPLANATIONS["busy"])
    top = page.locator("#top-examples .example")
    expect(top).to_have_count(len(data["examples"]["top"]))
    # the highlighted tokens of the first example are exactly its firing tokens, shaded (not transparent)
    first = data["examples"]["top"][0]
    on = top.first.locator(".t.on")
    expect(on).to_have_count(sum(a > 0 for a in first["acts"]))
    assert on.first.evaluate("e => getComputedStyle(e).backgroundColor") not in ("rgba(0, 0, 0, 0)", "transparent")
    expect(top.first.locator(".t.peak")).to_have_text(first["tokens"][first["peak_offset"]].replace("\n", "↵"))
    expect(page.locator("#promoted li")).to_have_count(len(data["promoted"]))
    expect(page.locator("#suppressed li")).to_have_count(len(data["suppressed"]))
    assert page.locator("svg.hist rect").count() == len(data["histogram"]["counts"])

    neighbours = page.locator("#neighbors a.neighbor")
    expect(neighbours).to_have_count(len(data["neighbors"]))
    other = data["neighbors"][0]["idx"]
    neighbours.first.click()
    expect(page.locator("#feature-idx")).to_have_text(str(other))
    assert page.url.endswith(f"/saes/{SAE}/features/{other}")


def test_out_of_range_feature_gives_404_json_and_an_error_page(page):
    response = page.goto(f"/api/saes/{SAE}/features/4096")
    assert response.status == 404 and response.headers["content-type"] == "application/json"
    body = json.loads(page.locator("body").inner_text())
    assert "out of range" in body["error"] and body["status"] == 404
    response = page.goto(f"/saes/{SAE}/features/4096")  # the page itself: same status, readable message
    assert response.status == 404
    expect(page.locator("#error-message")).to_contain_text("feature 4096 is out of range")


def test_prompt_inspector_shows_features_per_token_and_refuses_long_prompts(page, web_run):
    page.goto("/")
    page.click("#nav-inspect")
    text = "To be, or not to be, that is the question"
    page.fill("#prompt", text)
    page.click("#inspect-button")
    expected = page.request.post("/api/inspect", data={"text": text, "top": 5}).json()["tokens"]
    tokens = page.locator("#tokens .t")
    expect(tokens).to_have_count(len(expected))
    # click the token with the most features: its features are listed, linked to their pages
    i = max(range(len(expected)), key=lambda t: len(expected[t]["features"][SAE]))
    tokens.nth(i).click()
    expect(tokens.nth(i)).to_have_class("t on selected")
    feats = expected[i]["features"][SAE]
    rows = page.locator("#token-detail tr[data-idx]")
    expect(rows).to_have_count(len(feats))
    assert [int(x) for x in rows.evaluate_all("rs => rs.map(r => r.dataset.idx)")] == [f[0] for f in feats]
    rows.first.locator("a.feature-link").click()
    expect(page.locator("#feature-idx")).to_have_text(str(feats[0][0]))

    page.goto("/inspect")
    page.fill("#prompt", "word " * 300)  # 301 tokens: over the tiny model's 256
    page.click("#inspect-button")
    error = page.locator("#inspect-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("the limit is 256")
    expect(page.locator("#inspect-result")).to_be_hidden()
    page.fill("#prompt", "x" * 2500)  # over the server's character limit
    expect(page.locator("#char-count")).to_have_class("muted error")
    page.click("#inspect-button")
    expect(error).to_contain_text("2,500 characters; the limit is 2,000")
