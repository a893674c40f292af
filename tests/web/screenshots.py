"""Screenshots of a run's dashboard for the docs, taken in the same headless Chromium as the browser tests.

    .venv/bin/python -m tests.web.screenshots RUN_DIR [OUT_DIR] [--feature IDX] [--token TOKEN] [--prompt TEXT]
        [--steer-feature IDX --steer-strength S --steer-prompts "A|B"] [--pages overview,...,steer]

Writes overview.png, features.png (a search by token, ranked by relevance), feature.png (a feature page, full
length), inspector.png (a prompt inspected, one token selected and its first feature shaded across the prompt) and
steer.png (the steering playground after a request) into OUT_DIR
(default docs/screenshots); ``--pages`` takes a subset. The prompt inspector and the playground load the run's
model, so the run's model must be available (for the embedded one: ``saeforge fetch``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .browser import find_chromium, launch

PAGES = ("overview", "features", "feature", "inspector", "steer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("out", nargs="?", default="docs/screenshots")
    ap.add_argument("--feature", type=int, default=7)
    ap.add_argument("--token", default=" lord")
    ap.add_argument("--prompt", default="To be, or not to be, that is the question: whether 'tis nobler in the mind "
                                        "to suffer the slings and arrows of outrageous fortune")
    ap.add_argument("--select", type=int, default=7, help="the token selected in the inspector screenshot")
    ap.add_argument("--steer-feature", type=int, default=None, help="the feature steered (default: --feature)")
    ap.add_argument("--steer-mode", default="add")
    ap.add_argument("--steer-strength", type=float, default=2.0)
    ap.add_argument("--steer-prompts", default="Tell me about the weather|My favourite food is",
                    help="the playground's prompts, separated by |")
    ap.add_argument("--steer-tokens", type=int, default=24, help="new tokens per prompt in the playground")
    ap.add_argument("--pages", default=",".join(PAGES), help=f"which screenshots, of {','.join(PAGES)}")
    ap.add_argument("--request-timeout", type=float, default=900.0,
                    help="the server's limit on a model request (a busy CPU generates slowly)")
    args = ap.parse_args()
    pages = [x.strip() for x in args.pages.split(",") if x.strip()]
    unknown = sorted(set(pages) - set(PAGES))
    if unknown:
        raise SystemExit(f"unknown pages {unknown}: pick from {', '.join(PAGES)}")

    from playwright.sync_api import sync_playwright

    from saeforge.web.app import create_app
    from saeforge.web.serve import BackgroundServer

    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("chromium is not installed: run scripts/install_browser.sh")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    app = create_app(args.run, request_timeout=args.request_timeout, queue_timeout=args.request_timeout)
    sae = app.state.data.default_sae()
    with BackgroundServer(app) as srv, sync_playwright() as p:
        browser = launch(p, chromium)
        page = browser.new_page(viewport={"width": 1280, "height": 1000}, base_url=srv.url)
        page.set_default_timeout(180_000)
        if "overview" in pages:
            page.goto("/")
            page.wait_for_load_state("networkidle")
            page.screenshot(path=out / "overview.png", full_page=True)
        if "features" in pages:
            page.goto(f"/saes/{sae}/features")
            page.fill("#token", args.token)
            page.click("#search button[type=submit]")
            page.wait_for_load_state("networkidle")
            page.screenshot(path=out / "features.png")
        if "feature" in pages:
            page.goto(f"/saes/{sae}/features/{args.feature}")
            page.screenshot(path=out / "feature.png", full_page=True)
        if "inspector" in pages:
            page.goto("/inspect")
            page.fill("#prompt", args.prompt)
            page.click("#inspect-button")
            page.wait_for_selector("#tokens .t")
            page.click(f"#tokens .t >> nth={args.select}")
            if page.locator("#token-detail .heat-button").count():
                page.click("#token-detail .heat-button >> nth=0")
                page.wait_for_selector("#tokens.heat")
            page.screenshot(path=out / "inspector.png")
        if "steer" in pages:
            feature = args.feature if args.steer_feature is None else args.steer_feature
            page.goto(f"/saes/{sae}/features/{feature}")  # in through the feature page's link, as a user would
            page.click("#steer-link")
            page.wait_for_selector("#steer-form")
            page.fill("#prompts", "\n".join(args.steer_prompts.split("|")))
            page.select_option("#edit-rows .edit-mode", args.steer_mode)
            page.fill("#edit-rows .edit-strength", f"{args.steer_strength:g}")
            page.fill("#max-new-tokens", str(args.steer_tokens))
            page.click("#steer-button")
            # generation on a CPU takes a while (baseline and steered, and the model loads on the first request)
            page.wait_for_selector("#steer-result:not([hidden]), #steer-error:not([hidden])", timeout=900_000)
            if page.is_visible("#steer-error"):
                raise SystemExit(f"the playground refused: {page.inner_text('#steer-error')}")
            page.screenshot(path=out / "steer.png", full_page=True)
        browser.close()
    for name in pages:
        print(out / f"{name}.png")


if __name__ == "__main__":
    main()
