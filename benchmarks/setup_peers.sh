#!/usr/bin/env bash
# Create the peer virtual environments that benchmarks/train_step.py drives, one per tool, each with CPU torch
# installed first so that nothing pulls a CUDA build:
#
#     python3 -m venv V && V/bin/pip install torch==2.13.0 && V/bin/pip install TOOL
#
# Location: $SAEFORGE_PEERS (default: benchmarks/.work/peers, gitignored) -> $SAEFORGE_PEERS/saelens, .../sparsify.
# An existing venv whose tool already imports is left alone, so SAEFORGE_PEERS=/work/peers reuses those.
#
# Environment knobs:
#   SAEFORGE_PEERS       where the venvs go (default benchmarks/.work/peers)
#   PYTHON               interpreter for the venvs (default python3)
#   TORCH_VERSION        default 2.13.0
#   TORCH_INDEX_URL      an index to take torch from (default: none, pip's own configuration decides). Where the
#                        default index would give a CUDA build, use https://download.pytorch.org/whl/cpu
#   SAELENS_SPEC         default sae-lens==6.54.12
#   SPARSIFY_SPEC        default eai-sparsify==1.3.3
#
# Usage: benchmarks/setup_peers.sh [saelens] [sparsify]     (no argument: both)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
peers="${SAEFORGE_PEERS:-$here/.work/peers}"
python="${PYTHON:-python3}"
torch_version="${TORCH_VERSION:-2.13.0}"
torch_index="${TORCH_INDEX_URL:-}"
saelens_spec="${SAELENS_SPEC:-sae-lens==6.54.12}"
sparsify_spec="${SPARSIFY_SPEC:-eai-sparsify==1.3.3}"

tools=("$@")
[ ${#tools[@]} -eq 0 ] && tools=(saelens sparsify)

make_venv() {
  local name="$1" spec="$2" module="$3"
  local v="$peers/$name"
  if [ -x "$v/bin/python" ] && "$v/bin/python" -c "import $module" >/dev/null 2>&1; then
    echo "[$name] exists at $v ($("$v/bin/python" -c "import torch; print('torch', torch.__version__)"))"
    return 0
  fi
  echo "[$name] creating $v"
  mkdir -p "$peers"
  "$python" -m venv "$v"
  "$v/bin/pip" install --quiet --upgrade pip
  if [ -n "$torch_index" ]; then
    "$v/bin/pip" install --quiet "torch==$torch_version" --index-url "$torch_index"
  else
    "$v/bin/pip" install --quiet "torch==$torch_version"
  fi
  # the tool itself; the torch already installed satisfies its torch requirement, so pip keeps the CPU build
  "$v/bin/pip" install --quiet "$spec"
  "$v/bin/python" -c "import torch, $module; print('[$name] ok: torch', torch.__version__)"
}

for t in "${tools[@]}"; do
  case "$t" in
    saelens) make_venv saelens "$saelens_spec" sae_lens ;;
    sparsify) make_venv sparsify "$sparsify_spec" sparsify ;;
    *) echo "unknown tool: $t (expected saelens or sparsify)" >&2; exit 2 ;;
  esac
done
echo "peer venvs in $peers  (use: SAEFORGE_PEERS=$peers .venv/bin/python benchmarks/train_step.py --acts ...)"
