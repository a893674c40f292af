"""Screenshots of a run's dashboard for the docs, taken in the same headless Chromium as the browser tests.

    .venv/bin/python -m tests.web.screenshots RUN_DIR [OUT_DIR] [--feature IDX] [--token TOKEN] [--prompt TEXT]

Writes overview.png, features.png (a search by token), feature.png (a feature page, full length) and inspector.png
(a prompt inspected, one token selected) into OUT_DIR (default docs/screenshots). The prompt inspector loads the
run's model, so the run's model must be available (for the embedded one: ``saeforge fetch``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .browser import find_chromium, launch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("out", nargs="?", default="docs/screenshots")
    ap.add_argument("--feature", type=int, default=7)
    ap.add_argument("--token", default=" lord")
    ap.add_argument("--prompt", default="To be, or not to be, that is the question: whether 'tis nobler in the mind "
                                        "to suffer the slings and arrows of outrageous fortune")
    ap.add_argument("--select", type=int, default=7, help="the token selected in the inspector screenshot")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    from saeforge.web.app import create_app
    from saeforge.web.serve import BackgroundServer

    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("chromium is not installed: run scripts/install_browser.sh")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    app = create_app(args.run)
    sae = app.state.data.default_sae()
    with BackgroundServer(app) as srv, sync_playwright() as p:
        browser = launch(p, chromium)
        page = browser.new_page(viewport={"width": 1280, "height": 1000}, base_url=srv.url)
        page.set_default_timeout(180_000)
        page.goto("/")
        page.wait_for_load_state("networkidle")
        page.screenshot(path=out / "overview.png", full_page=True)
        page.goto(f"/saes/{sae}/features")
        page.fill("#token", args.token)
        page.click("#search button[type=submit]")
        page.wait_for_load_state("networkidle")
        page.screenshot(path=out / "features.png")
        page.goto(f"/saes/{sae}/features/{args.feature}")
        page.screenshot(path=out / "feature.png", full_page=True)
        page.goto("/inspect")
        page.fill("#prompt", args.prompt)
        page.click("#inspect-button")
        page.wait_for_selector("#tokens .t")
        page.click(f"#tokens .t >> nth={args.select}")
        page.screenshot(path=out / "inspector.png")
        browser.close()
    for name in ("overview", "features", "feature", "inspector"):
        print(out / f"{name}.png")


if __name__ == "__main__":
    main()
