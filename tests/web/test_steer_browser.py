"""The steering playground end to end in headless Chromium (see test_browser.py): fill the form, steer, read the
columns and the measured effect; errors shown on the page; a feature page's "steer with this feature" link."""

from __future__ import annotations

import pytest

from .conftest import SAE
from .test_browser import CHROMIUM, TIMEOUT_MS, browser, expect, page, server  # noqa: F401  (fixtures, skips)

assert CHROMIUM  # test_browser skips the module (or fails under CI) when it is missing


def _row(pg, i=0):
    return pg.locator("#edit-rows .edit-row").nth(i)


def test_steer_form_shows_baseline_and_steered_columns_and_the_effect(page, web_run):  # noqa: F811
    idx = web_run[1]["busy"]
    prompts = ["To be, or not to be", "Now is the winter of"]
    page.goto("/")
    page.click("#nav-steer")
    expect(page.locator("#steer-form")).to_be_visible()
    page.fill("#prompts", "\n".join(prompts) + "\n\n")  # blank lines are dropped
    row = _row(page)
    row.locator(".edit-feature").fill(str(idx))
    expect(row.locator(".edit-link")).to_have_attribute("href", f"/saes/{SAE}/features/{idx}")
    row.locator(".edit-mode").select_option("add")
    row.locator(".edit-strength").fill("3")
    # a second row, added then removed again: one edit is sent
    page.click("#add-edit")
    expect(page.locator("#edit-rows .edit-row")).to_have_count(2)
    _row(page, 1).locator(".remove-edit").click()
    expect(page.locator("#edit-rows .edit-row")).to_have_count(1)
    page.fill("#max-new-tokens", "5")
    page.fill("#temperature", "0.8")
    page.fill("#seed", "4")
    page.click("#steer-button")

    cards = page.locator("#outputs .prompt-result")
    expect(cards).to_have_count(2)
    want = page.request.post("/api/steer", data={
        "prompts": prompts, "edits": [{"sae": SAE, "feature": idx, "mode": "add", "strength": 3, "unit": "max"}],
        "positions": "all", "max_new_tokens": 5, "temperature": 0.8, "seed": 4}).json()
    for i, p in enumerate(prompts):
        card = cards.nth(i)
        expect(card.locator(".prompt-text")).to_have_text(p)
        for kind in ("baseline", "steered"):
            column = card.locator(f".column.{kind}")
            expect(column.locator("h3")).to_contain_text(kind)
            expect(column.locator(".prompt-echo")).to_have_text(p)
            assert column.locator(".generated").text_content() == want[kind][i]
    m = want["metrics"]
    effect = page.locator(f'#effect-table tr[data-feature="{idx}"]')
    expect(effect).to_have_count(1)
    kinds = ("baseline", "steered", "injected")
    shown = [float(effect.locator(f".act-{k}").text_content()) for k in kinds]
    assert shown == pytest.approx([m["edits"][0][f"target_activation_{k}"] for k in kinds], rel=1e-3, abs=1e-6)
    # the plain model's reading of a 5-token text may not move on a random tiny model; the injection always does
    assert shown[2] > shown[0]
    expect(effect.locator("a.feature-link")).to_have_attribute("href", f"/saes/{SAE}/features/{idx}")
    kl = float(page.locator("#kl").text_content())
    assert kl == pytest.approx(m["kl_prompt"], rel=1e-3) and kl > 0
    ppl = [float(page.locator(s).text_content()) for s in ("#ppl-baseline", "#ppl-steered")]
    assert ppl == pytest.approx([sum(m[k]) / 2 for k in ("perplexity_baseline", "perplexity_steered")], rel=1e-3)
    expect(page.locator("#steer-error")).to_be_hidden()
    expect(page.locator("#steer-button")).to_have_text("Steer")


def test_errors_are_shown_on_the_page(page):  # noqa: F811
    page.goto("/steer")
    page.fill("#prompts", "To be, or not to be")
    _row(page).locator(".edit-feature").fill("4096")
    page.click("#steer-button")
    error = page.locator("#steer-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text(f"feature 4096 is out of range for SAE '{SAE}' (0..127)")
    expect(page.locator("#steer-result")).to_be_hidden()
    # an absurd strength: the allowed range is named
    _row(page).locator(".edit-feature").fill("1")
    _row(page).locator(".edit-unit").select_option("raw")
    _row(page).locator(".edit-strength").fill("1e9")
    page.click("#steer-button")
    expect(error).to_contain_text("|strength| ≤ 100000 (unit raw)")


def test_a_feature_pages_steer_link_prefills_the_form(page, web_run):  # noqa: F811
    idx = web_run[1]["third"]
    page.goto(f"/saes/{SAE}/features/{idx}")
    page.click("#steer-link")
    page.wait_for_url("**/steer?*")
    row = _row(page)
    expect(row.locator(".edit-sae")).to_have_value(SAE)
    expect(row.locator(".edit-feature")).to_have_value(str(idx))
    expect(row.locator(".edit-mode")).to_have_value("add")
    expect(page.locator("#edit-rows .edit-row")).to_have_count(1)
