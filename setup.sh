#!/usr/bin/env bash
# Installs hfllm into the active Python. Usage: bash setup.sh [dev]
#   On a machine without an NVIDIA GPU it first installs the CPU build of torch (torch==2.13.0) so that nothing
#   pulls a multi-GB CUDA build; where torch is already importable (your own CUDA build, say) it is kept.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q torch==2.13.0 --extra-index-url "${HFLLM_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" \
      || "$PY" -m pip install -q torch==2.13.0
  fi
fi
extras=""
[ "${1:-}" = "dev" ] && extras="[dev]"
"$PY" -m pip install -q -e ".${extras}"
"$PY" -c "import torch, transformers, hfllm; print(f'hfllm {hfllm.__version__} ready: torch {torch.__version__}, transformers {transformers.__version__}')"
