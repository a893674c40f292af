"""Screenshots of a run's tree and module pages for docs/hierarchy.md, in the same headless Chromium as the browser
tests (nothing here runs the model).

    .venv/bin/python -m tests.web.hierarchy_screenshots RUN_DIR [OUT_DIR] [--tree NAME] [--modules NAME]

Writes hierarchy_tree.png (the first parents of the tree, ordered by number of children) and modules.png (the module
view with its evaluation table) into OUT_DIR (default docs/screenshots).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .browser import find_chromium, launch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("out", nargs="?", default="docs/screenshots")
    ap.add_argument("--tree", default="", help="the tree page to take (default: none)")
    ap.add_argument("--modules", default="", help="the modules page to take (default: none)")
    ap.add_argument("--limit", type=int, default=8, help="parents shown on the tree page")
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
    written = []
    with BackgroundServer(app) as srv, sync_playwright() as p:
        browser = launch(p, chromium)
        page = browser.new_page(viewport={"width": 1280, "height": 1000}, base_url=srv.url)
        page.set_default_timeout(120_000)
        if args.tree:
            page.goto(f"/hierarchy/{args.tree}?limit={args.limit}")
            page.wait_for_selector("#tree")
            page.screenshot(path=out / "hierarchy_tree.png", full_page=True)
            written.append(out / "hierarchy_tree.png")
        if args.modules:
            page.goto(f"/modules/{args.modules}")
            page.wait_for_selector("section.module")
            page.screenshot(path=out / "modules.png", full_page=True)
            written.append(out / "modules.png")
        browser.close()
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
