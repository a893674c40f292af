#!/usr/bin/env bash
# One command from a fresh clone: set everything up, then run the demo on the embedded model and corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${SAEFORGE_VENV:-.venv}/bin/saeforge" demo "$@"
