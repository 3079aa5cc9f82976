#!/usr/bin/env bash
# One command for the day a GPU is lent (one H100 / H200; no vLLM, no network, no `datasets` needed):
#
#     bash scripts/gpu_check.sh                 # ~6 minutes on one H200; never more than BUDGET_S (570 s)
#     SIZES=3b RL_RESPONSE=4096 bash scripts/gpu_check.sh
#
# For a random-weight Qwen2.5-VL at the real 3B and 7B shapes (real vocabulary; made here, nothing
# downloaded), it runs sft.py (3 steps at --max_length 4096) and rl.py (--backend hf, 2 steps, a few prompts)
# on synthetic text-only data, and prints tokens/s, MFU and torch.cuda.max_memory_allocated next to
# scripts/memory_plan.py's prediction for the same flags. Checkpoint saving is skipped (a 7B's training
# state, fp32 weights + AdamW, is ~100 GB: more than the machine's disk); results.jsonl keeps everything.
#
# One GPU holds a whole 7B with fp32 AdamW (116.5 GiB) only just: the 7B runs 1 example per micro-batch
# and rl.py with --beta 0 (no reference model); memory_plan.py shows why.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WORK=${WORK:-/tmp/gpu_check}
SIZES=${SIZES:-"3b 7b"}
SFT_LENGTH=${SFT_LENGTH:-4096}     # tokens per example, every example truncated to it
RL_RESPONSE=${RL_RESPONSE:-1024}   # response tokens (random weights never stop: every response is this long)
RL_PROMPTS=${RL_PROMPTS:-4}        # prompts per step, x RL_GENERATIONS completions
RL_GENERATIONS=${RL_GENERATIONS:-4}
BUDGET_S=${BUDGET_S:-570}          # the whole script stays under this (each step's timeout is cut to fit)
SMOKE=${SMOKE:-}                   # 1: one decoder layer and one vision block (a CPU dry run of this script)
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
rm -rf "$WORK" && mkdir -p "$WORK"
limit() {  # seconds a step may take: at most $1, and never past the budget (0: no time left to start it)
    local left=$(( BUDGET_S - SECONDS - 15 ))
    if [ $left -lt 45 ]; then echo 0; elif [ $left -lt "$1" ]; then echo $left; else echo "$1"; fi
}
RESULTS=$WORK/results.jsonl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

$PY scripts/gpu_check.py data --output_dir "$WORK/data" --sft_rows 16 --sft_tokens $((SFT_LENGTH + 100)) --rl_rows 64 \
    || exit 1

for size in $SIZES; do
    if [ "$size" = 7b ]; then SFT_BATCH=1; BETA=0; else SFT_BATCH=4; BETA=0.01; fi
    MODEL=$WORK/model-$size
    T=$(limit 180); if [ "$T" = 0 ]; then echo "budget spent: skipping $size"; continue; fi
    timeout "$T" $PY scripts/gpu_check.py model --size "$size" --output_dir "$MODEL" ${SMOKE:+--num_layers 1 --vision_depth 1} \
        || { echo "model $size failed"; continue; }

    SFT_FLAGS="--max_length $SFT_LENGTH --per_device_batch_size $SFT_BATCH --gradient_checkpointing true"
    T=$(limit 180); if [ "$T" = 0 ]; then echo "budget spent: skipping $size"; rm -rf "$MODEL"; continue; fi
    timeout -k 10 "$T" $PY scripts/gpu_check.py run --name "sft-$size" --results "$RESULTS" \
        --plan "--model $MODEL --stage sft $SFT_FLAGS" -- \
        sft.py --model_name_or_path "$MODEL" --dataset "$WORK/data/sft.jsonl" --output_dir "$WORK/sft-$size" \
        --max_steps 3 --save_steps 0 $SFT_FLAGS || echo "sft-$size: killed or crashed"

    T=$(limit 240); if [ "$T" = 0 ]; then echo "budget spent: skipping rl-$size"; rm -rf "$MODEL"; continue; fi
    RL_FLAGS="--backend hf --prompts_per_step $RL_PROMPTS --num_generations $RL_GENERATIONS --max_prompt_length 1024
              --max_response_length $RL_RESPONSE --generation_batch_size $((RL_PROMPTS * RL_GENERATIONS)) --beta $BETA
              --gradient_checkpointing true"
    timeout -k 10 "$T" $PY scripts/gpu_check.py run --name "rl-$size" --results "$RESULTS" \
        --plan "--model $MODEL --stage rl $RL_FLAGS" -- \
        rl.py --model_name_or_path "$MODEL" --dataset "$WORK/data/rl.json" --output_dir "$WORK/rl-$size" \
        --max_steps 2 --save_steps 0 $RL_FLAGS || echo "rl-$size: killed or crashed"
    rm -rf "$MODEL"  # disk: the next size needs the room
done

$PY scripts/gpu_check.py report --results "$RESULTS"
echo "total ${SECONDS}s; raw numbers in $RESULTS"
