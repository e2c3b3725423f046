#!/usr/bin/env bash
# Installs hfllm into the active Python. Usage: bash setup.sh [dev]
#   - By default every package is installed at the exact version the test suite passed on (constraints.txt), so the
#     README's commands behave the same months from now.
#   - HFLLM_LATEST=1 bash setup.sh dev installs the newest releases instead, to check upstream before users meet it;
#     then run the suite as usual (`python3 -m pytest -q`, or `-m upstream` for the contracts alone).
#     constraints.txt is rewritten with `python3 .ci/freeze_constraints.py > constraints.txt`.
#   - On a machine without an NVIDIA GPU it first installs the CPU build of torch (torch==2.13.0) so that nothing
#     pulls a multi-GB CUDA build; where torch is already importable (your own CUDA build, say) it is kept.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install -q torch==2.13.0
  else
    cpu_index=${HFLLM_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
    if "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" "$cpu_index" 2>/dev/null; then
      "$PY" -m pip install -q torch==2.13.0 --index-url "$cpu_index"
    else  # the CPU index is out of reach: a local wheel (pip's find-links) or PyPI
      "$PY" -m pip install -q torch==2.13.0
    fi
  fi
fi
extras=""
[ "${1:-}" = "dev" ] && extras="[dev]"
if [ "${HFLLM_LATEST:-0}" = "1" ]; then
  "$PY" -m pip install -q -e ".${extras}"
  # the fast-moving dependencies at their newest releases
  latest="transformers trl peft accelerate datasets"
  [ -n "$extras" ] && latest="$latest lm-eval bitsandbytes"
  "$PY" -m pip show -q deepspeed >/dev/null 2>&1 && latest="$latest deepspeed"
  "$PY" -m pip install -q --upgrade $latest
else
  # torch keeps the build installed above (CPU or your own CUDA build); everything else is pinned
  constraints=$(mktemp)
  grep -v '^torch==' constraints.txt > "$constraints"
  "$PY" -m pip install -q -c "$constraints" -e ".${extras}"
  rm -f "$constraints"
fi
"$PY" -c "import torch, transformers, hfllm; print(f'hfllm {hfllm.__version__} ready: torch {torch.__version__}, transformers {transformers.__version__}')"
