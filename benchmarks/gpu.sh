#!/usr/bin/env bash
# The GPU speed path in one command (about 8 minutes on an H100/H200): tokens/s, MFU and peak memory of recipes/125m
# and recipes/350m, hfllm eager / compile / FlashAttention-2 / FP8 / Liger against transformers' LlamaForCausalLM of
# the same shape under the same Trainer settings; writes the GPU section of benchmarks/RESULTS.md. See benchmarks/gpu.py.
#   bash benchmarks/gpu.sh [--recipes 350m] [--rows Liger Llama] [--steps 30]
# Kernels it installs (never torch): liger-kernel and torchao at the versions of setup.cfg's `gpu` extra, from
# benchmarks/wheels/ when that folder exists (a machine without network: `pip download --no-deps -d benchmarks/wheels
# liger-kernel==0.8.5 torchao==0.18.0` beforehand), otherwise from the package index. flash-attn needs a prebuilt
# wheel for the machine's torch and CUDA; without it the FlashAttention rows are skipped with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "benchmarks/gpu.sh needs a CUDA GPU and none is visible; dry run on CPU: $PY benchmarks/gpu.py --device cpu --tiny" >&2
  exit 2
fi
source=()
[ -d benchmarks/wheels ] && source=(--no-index --find-links benchmarks/wheels)
for requirement in liger-kernel==0.8.5 torchao==0.18.0; do
  "$PY" -c "import importlib.metadata as m, sys; n, v = sys.argv[1].split('=='); sys.exit(m.version(n) != v)" \
    "$requirement" 2>/dev/null && continue
  "$PY" -m pip install -q --no-deps "${source[@]}" "$requirement" \
    || echo "note: could not install $requirement; the rows that need it are skipped" >&2
done
"$PY" -c "import flash_attn" 2>/dev/null || echo "note: flash-attn is not installed; the FlashAttention rows are skipped" >&2
exec "$PY" benchmarks/gpu.py "$@"
