#!/usr/bin/env bash
# Reproduces the fault table of issue 12 (docs/reliability.md) on the shakespeare-char recipe: kill -9, SIGTERM, a truncated newest checkpoint and divergence, each from outside (CPU, no compile; about 10 min on 2 cores).
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
R="recipes/shakespeare-char.yaml --max_steps 60 --logging_steps 10 --eval_steps 1000 --torch_compile false --num_samples 0 --report_to none --disable_tqdm true"
O=runs/faults; rm -rf $O; mkdir -p $O
losses() { python3 -c "import json,sys; h=json.load(open(sys.argv[1]+'/trainer_state.json'))['log_history']; print([round(e['loss'],6) for e in h if 'loss' in e])" "$1"; }
echo "== reference: uninterrupted"
python3 -m hfllm pretrain $R --save_steps 20 --output_dir $O/ref > $O/ref.log 2>&1; echo "exit $?"; losses $O/ref

echo "== 1. kill -9 after checkpoint-40, then --resume_from_checkpoint true"
python3 -m hfllm pretrain $R --save_steps 20 --output_dir $O/kill > $O/kill.log 2>&1 & pid=$!
while [ ! -d $O/kill/checkpoint-40 ]; do sleep 0.5; done; kill -9 $pid; wait $pid; echo "killed: exit $?"; ls $O/kill | grep checkpoint
python3 -m hfllm pretrain $R --save_steps 20 --output_dir $O/kill --resume_from_checkpoint true > $O/kill2.log 2>&1; echo "resume exit $?"; losses $O/kill

echo "== 2. SIGTERM mid-run, next save due at step 1000"
python3 -m hfllm pretrain $R --save_steps 1000 --output_dir $O/term > $O/term.log 2>&1 & pid=$!
while ! grep -q "'loss'" $O/term.log 2>/dev/null; do sleep 0.5; done; sleep 3; kill -TERM $pid; wait $pid; echo "SIGTERM: exit $?"; ls $O/term | grep checkpoint; tail -3 $O/term.log
python3 -m hfllm pretrain $R --save_steps 1000 --output_dir $O/term --resume_from_checkpoint true > $O/term2.log 2>&1; echo "resume exit $?"; losses $O/term

echo "== 3. newest checkpoint half-written (model.safetensors truncated), then resume"
cp -r $O/ref $O/trunc; sed -i "s|$O/ref|$O/trunc|" $O/trunc/recipe.yaml; rm -rf $O/trunc/model.safetensors $O/trunc/config.json
f=$O/trunc/checkpoint-60/model.safetensors; truncate -s $(( $(stat -c %s $f) / 2 )) $f
python3 -m hfllm pretrain $R --save_steps 20 --output_dir $O/trunc --resume_from_checkpoint true > $O/trunc.log 2>&1; echo "resume exit $?"; grep -i "skip\|corrupt\|incomplete" $O/trunc.log | head -3; losses $O/trunc

echo "== 4. divergence: --learning_rate 1e4 --max_grad_norm 0"
python3 -m hfllm pretrain $R --save_steps 20 --learning_rate 1e4 --max_grad_norm 0 --output_dir $O/div > $O/div.log 2>&1; echo "exit $?"; tail -4 $O/div.log
python3 - <<'PY'
from pathlib import Path
from safetensors.torch import load_file
import torch
bad = [str(p) for p in Path("runs/faults/div").rglob("*.safetensors") if not all(torch.isfinite(t).all() for t in load_file(p).values())]
print("files with non-finite weights:", bad or "none")
PY
