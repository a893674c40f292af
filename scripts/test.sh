#!/usr/bin/env bash
# One command from a fresh clone: set everything up, then run the test suite (slow tests excluded; add -m slow
# to run only those, or -m "" to run everything). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_browser.sh  # Debian chromium (+ fonts) for the dashboard's browser tests
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${SAEFORGE_VENV:-.venv}/bin/python" -m pytest -q "$@"
