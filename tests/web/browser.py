"""Headless Chromium for the dashboard's browser tests and screenshots: Debian's ``chromium`` driven by Playwright
(never Playwright's own browser download: ``scripts/install_browser.sh`` installs both)."""

from __future__ import annotations

import os
import shutil

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def find_chromium() -> str | None:
    """Debian's chromium ($SAEFORGE_CHROMIUM overrides), or None when it is not installed."""
    for candidate in (os.environ.get("SAEFORGE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def launch(playwright, executable: str):
    return playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS, timeout=30_000)
