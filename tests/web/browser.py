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


def require_browser() -> str:
    """Chromium's path for a module of browser tests; the module is skipped when Playwright or Debian's chromium is
    missing, except under CI, which must run them (the test fails instead)."""
    import importlib.util

    import pytest

    def missing(reason: str):
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must run the browser tests: scripts/install_browser.sh installs it)")
        pytest.skip(f"{reason}: run scripts/install_browser.sh", allow_module_level=True)

    if importlib.util.find_spec("playwright") is None:
        missing("Playwright for Python is not installed")
    chromium = find_chromium()
    if chromium is None:
        missing("Debian's chromium is not installed")
    return chromium


def launch(playwright, executable: str):
    return playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS, timeout=30_000)
