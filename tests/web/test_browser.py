"""The dashboard end to end in a real headless Chromium (Debian's ``chromium``, driven by Playwright) against a
uvicorn server on 127.0.0.1. ``scripts/install_browser.sh`` installs both; without chromium these tests skip, except
under CI (``CI`` set), where a missing browser is a failure rather than a silent skip."""

from __future__ import annotations

import json

import pytest

from .browser import launch, require_browser
from .conftest import EXPLANATIONS, SAE

TIMEOUT_MS = 20_000

CHROMIUM = require_browser()  # skips the module without a browser (fails under CI)

from playwright.sync_api import expect, sync_playwright  # noqa: E402  (after the check)


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


# ------------------------------------------------------------------------------------------------ rough edges
def test_a_plot_opens_full_size_and_closes(page):
    page.goto("/")
    link = page.locator(".plots a.plot-link").first
    thumb = link.locator("img")
    thumb.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=thumb.element_handle())
    shown = thumb.evaluate("img => img.getBoundingClientRect().width")
    natural = thumb.evaluate("img => img.naturalWidth")
    assert shown < natural  # a thumbnail
    link.click()
    box = page.locator("#lightbox")
    expect(box).to_be_visible()
    big = box.locator("img")
    page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=big.element_handle())
    assert big.evaluate("img => Math.round(img.getBoundingClientRect().width)") == natural  # at its own size
    expect(box.locator(".caption")).to_have_text(link.get_attribute("data-name"))
    page.keyboard.press("Escape")
    expect(box).to_be_hidden()
    link.click()
    expect(box).to_be_visible()
    box.click()  # a click anywhere closes it too
    expect(box).to_be_hidden()


def test_feature_list_sorts_rarest_first_hides_dead_and_ranks_a_token_search(page, web_run):
    from saeforge.web.render import share

    page.goto(f"/saes/{SAE}/features")
    everything = page.request.get(f"/api/saes/{SAE}/features", params={"limit": 500}).json()
    expect(page.locator("#dead-count")).to_have_text(share(everything["n_dead"], 128))
    page.select_option("#order", "density_asc")
    page.check("#alive")
    page.click("#search button[type=submit]")
    rows = page.locator("#feature-table tbody tr")
    want = page.request.get(f"/api/saes/{SAE}/features", params={"order": "density_asc", "alive": "true"}).json()
    assert [int(i) for i in rows.evaluate_all("rs => rs.map(r => r.dataset.idx)")] == \
           [f["idx"] for f in want["features"]]
    assert all(f["fire_count"] > 0 for f in want["features"])
    dens = [f["density"] for f in want["features"]]
    assert dens == sorted(dens)
    expect(page.locator("#alive")).to_be_checked()
    expect(page.locator("#match-count")).to_contain_text(f"{want['total']} features match")

    # a token search switches the order to relevance and shows the hits
    token = page.request.get(f"/api/saes/{SAE}/features/{web_run[1]['busy']}").json()["top_tokens"][0][0]
    page.goto(f"/saes/{SAE}/features")
    page.fill("#token", token)
    expect(page.locator("#order")).to_have_value("relevance")
    page.click("#search button[type=submit]")
    want = page.request.get(f"/api/saes/{SAE}/features", params={"token": token}).json()
    hits = page.locator("#feature-table td.hits")
    expect(hits).to_have_count(len(want["features"]))
    assert [int(h.split()[0]) for h in hits.all_inner_texts()] == [f["token_hits"] for f in want["features"]]
    expect(page.locator("#match-count")).to_contain_text(f"{want['total']} feature")


def test_tokens_show_their_spaces_control_tokens_and_stay_inside_their_cards(page, web_run):
    page.set_viewport_size({"width": 900, "height": 900})
    data = None
    for idx in range(128):  # a feature with a leading-space top token and a window that holds the BOS token
        d = page.request.get(f"/api/saes/{SAE}/features/{idx}").json()
        ex = [e for k in ("top", "quantile") for e in d["examples"][k]]
        if any(t.startswith(" ") for t, _ in d["top_tokens"] or []) and any("<bos>" in e["tokens"] for e in ex):
            data = d
            break
    assert data is not None
    page.goto(f"/saes/{SAE}/features/{data['idx']}")
    first = next(t for t, _ in data["top_tokens"] if t.startswith(" "))
    chip = page.locator("#top-tokens .tok").nth([t for t, _ in data["top_tokens"]].index(first))
    expect(chip.locator(".ws").first).to_have_text("␣")
    assert chip.inner_text().replace("␣", " ") == first
    ctl = page.locator("#top-examples .ex-text .ctl, #quantile-examples .ex-text .ctl")
    assert ctl.count() >= 1 and set(ctl.all_inner_texts()) == {"bos"}
    assert "<bos>" not in page.locator("#top-examples").inner_text()
    # every example row fits its card, on a narrow window too
    for width in (900, 320):
        page.set_viewport_size({"width": width, "height": 900})
        overflow = page.evaluate("""() => Array.from(document.querySelectorAll('.examples .example')).filter(ex => {
            const card = ex.closest('.card').getBoundingClientRect();
            return ex.getBoundingClientRect().right > card.right + 0.5 || ex.scrollWidth > ex.clientWidth + 1;
        }).length""")
        assert overflow == 0, f"{overflow} example rows overflow at {width}px"


def test_the_explanation_says_its_chance_level_and_author(page, web_run):
    page.goto(f"/saes/{SAE}/features/{web_run[1]['third']}")
    expect(page.locator("#score")).to_have_text("0.55")
    expect(page.locator("#chance")).to_have_text("0.5")
    expect(page.locator("#score-line")).to_contain_text("not above chance")
    expect(page.locator("#explainer")).to_contain_text("written by test:judge")
    page.goto(f"/saes/{SAE}/features/{web_run[1]['label']}")
    expect(page.locator("#fallback-badge")).to_be_visible()


def test_inspector_shows_one_feature_across_the_whole_prompt(page, web_run):
    text = "To be, or not to be, that is the question"
    page.goto("/inspect")
    page.fill("#prompt", text)
    page.click("#inspect-button")
    tokens = page.locator("#tokens .t")
    expect(tokens.first).to_be_visible()
    expect(page.locator("#tokens .t.special .ctl")).to_have_text("bos")  # the BOS token, by name
    row = page.locator("#token-detail tr[data-idx]").first
    idx = int(row.get_attribute("data-idx"))
    row.locator(".heat-button").click()
    legend = page.locator("#heat-legend")
    expect(legend).to_be_visible()
    expect(legend.locator("a.feature-link")).to_have_text(f"#{idx}")
    want = page.request.post("/api/inspect/feature", data={"text": text, "sae": SAE, "feature": idx}).json()
    expect(page.locator("#tokens.heat")).to_have_count(1)
    shown = [float(a) for a in tokens.evaluate_all("ts => ts.map(t => t.dataset.act)")]
    assert shown == pytest.approx(want["acts"], rel=1e-6, abs=1e-9)
    on = tokens.evaluate_all("ts => ts.filter(t => t.classList.contains('on')).length")
    assert on == sum(a > 0 for a in want["acts"]) > 0
    assert "37, 99, 235" in page.locator("#tokens .t.on").first.evaluate("e => e.style.background")
    page.click("#heat-clear")
    expect(page.locator("#tokens.heat")).to_have_count(0)
    expect(legend).to_be_hidden()


def test_every_page_has_the_favicon(page):
    for path in ("/", f"/saes/{SAE}/features", "/inspect", "/steer"):
        page.goto(path)
        href = page.locator('link[rel="icon"]').get_attribute("href")
        r = page.request.get(href)
        assert r.status == 200 and r.headers["content-type"].startswith("image/svg+xml")
