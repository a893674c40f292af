#!/usr/bin/env bash
# Install what the dashboard's browser tests (tests/web/test_browser.py) need: Debian's chromium (apt-get) and
# Playwright for Python (pip, into the project's virtual environment). The tests drive the system chromium, so
# Playwright's own browser download (`playwright install`) is never used. Safe to re-run: it installs only what is
# missing.
#
#   SAEFORGE_VENV   the virtual environment (default: .venv in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SAEFORGE_VENV:-.venv}"
log() { printf '[install_browser] %s\n' "$*"; }

if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  log "chromium is installed: $(chromium --version 2>/dev/null | head -1)"
elif command -v apt-get >/dev/null 2>&1; then
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then SUDO=(sudo); fi
  log "installing chromium with apt-get"
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-liberation \
    >/dev/null
  log "installed: $(chromium --version 2>/dev/null | head -1)"
else
  log "no apt-get here: install Chromium yourself (or set SAEFORGE_CHROMIUM to its binary); the browser tests skip without it"
fi

if "$VENV/bin/python" -c "import playwright.sync_api" 2>/dev/null; then
  log "Playwright for Python is installed"
else
  log "installing Playwright for Python into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "playwright>=1.40"
fi
