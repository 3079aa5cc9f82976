#!/usr/bin/env bash
# X-Reasoner in miniature, on the CPU: does reasoning learned from text alone carry over to images?
#
#   bash scripts/toy.sh            # ~19 min on 2 quiet cores; writes runs/toy/{summary.json,report.md}
#
# 0. a toy "base VLM": a random ~2M-parameter Qwen2.5-VL whose vision tower first learns to put each drawn
#    character at its text embedding (toy_align.py, as a real VLM's projector is aligned), then learns to
#    read drawn two-digit additions and answer text and image questions directly (sft.py on chat rows with
#    images; the aligned vision side frozen)
# 1. SFT on text-only chains of thought (sft.py; the OpenThoughts rows in the chat shape; vision frozen),
#    written by an imperfect teacher that forgets the carry in 30% of its carry problems and, in 30% of its
#    rows, restates a different problem than asked and solves that one
# 2. GRPO on text-only problems with a verifiable reward (rl.py --backend hf, Orz-shaped rows)
# 3. evaluation of base / SFT / SFT+RL on held-out problems as text and as images, greedy, and of SFT and
#    SFT+RL on the text problems sampled at temperature 1 (evaluate.py), plus one rejection-sampling pass
#    from the SFT model (distill.py); the report probes how each model's chain works (toy_probe.py)
# The paper's ablations over 3 seeds: scripts/toy_ablations.sh (reuses this run as seed 0).
# A stage whose output exists is skipped, so an interrupted run continues where it stopped; delete
# runs/toy (or set RUN_DIR) for a fresh run. Every size below can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
RUN=${RUN_DIR:-runs/toy}
SEED=${SEED:-0}
BASE_STEPS=${BASE_STEPS:-1500}   # stage 0: reading drawn problems is learned from scratch (slowest part)
SFT_STEPS=${SFT_STEPS:-1000}     # stage 1 (vision tower and projector frozen)
SFT_LR=${SFT_LR:-1e-3}
RL_STEPS=${RL_STEPS:-30}         # stage 2
RL_PROMPTS=${RL_PROMPTS:-16}     # prompts per GRPO step (x 8 generations)
RL_LR=${RL_LR:-3e-5}             # 1e-4 and above: the policy-gradient noise erodes the tiny model's arithmetic
N_TEST=${N_TEST:-200}            # held-out problems, each asked as text and as an image
DISTILL_N=${DISTILL_N:-64}       # questions for the distillation pass
ALIGN=${ALIGN:-1}                # 1: align the vision tower to the language model's embeddings first (toy_align.py)
ALIGN_STEPS=${ALIGN_STEPS:-300}
STAGE0_VISION=${STAGE0_VISION:-freeze}  # stage 0 trains the vision tower and projector (train) or not (freeze)
QUESTION_FORMS=${QUESTION_FORMS:-varied}  # varied: training questions state the problem in several forms (or: digits)
MISREAD_RATE=${MISREAD_RATE:-0.3}  # stage 1's teacher misreads the problem, then solves what it restated
MISREAD_DIGITS=${MISREAD_DIGITS:-4}  # digits of the problem a misreading changes (4: a different problem)
SLIP_RATE=${SLIP_RATE:-0.3}      # stage 1's teacher forgets the carry in this fraction of its carry problems
T1_SAMPLES=${T1_SAMPLES:-4}      # samples per held-out text problem at temperature 1 (what GRPO optimises; 0: skip)
STAGE1=${STAGE1:-cot}            # stage 1's rows: cot (chains of thought), direct (answers only), none (no SFT)
STAGE2=${STAGE2:-grpo}           # grpo, or none (no RL)
THINK_BUDGET=${THINK_BUDGET:-0}  # evaluation's forced exit: "</think>" after this many thinking tokens (0: off)
PROBE_LIMIT=${PROBE_LIMIT:-100}  # held-out problems in the report's mechanism probe (scripts/toy_probe.py; 0: skip)
export TOKENIZERS_PARALLELISM=false
# One thread per process: on a CPU shared with other work, two spinning OpenMP threads made steps ~10x slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$RUN"
for knob in SEED BASE_STEPS SFT_STEPS SFT_LR RL_STEPS RL_PROMPTS RL_LR N_TEST ALIGN STAGE0_VISION QUESTION_FORMS \
            MISREAD_RATE MISREAD_DIGITS SLIP_RATE STAGE1 STAGE2 THINK_BUDGET; do
  printf '%s=%s\n' "$knob" "${!knob}"
done > "$RUN/settings.txt"  # what this run was asked to do (the report quotes it)

timed() {  # timed NAME OUTPUT CMD...: run CMD unless OUTPUT exists; record its seconds
  local name=$1 output=$2; shift 2
  if [ -e "$output" ]; then echo "== $name: $output exists, skipped"; return; fi
  echo "== $name"
  local start=$SECONDS
  "$@"
  printf '%s\t%s\n' "$name" $((SECONDS - start)) >> "$RUN/timings.tsv"
}

timed "data" "$RUN/data/done" bash -c "
  $PY scripts/make_toy_data.py --output_dir $RUN/data --seed $SEED --n_base 6000 --n_train 4000 --n_rl 2000 \
    --n_test $N_TEST --slip_rate $SLIP_RATE --misread_rate $MISREAD_RATE --misread_digits $MISREAD_DIGITS --question_forms $QUESTION_FORMS &&
  touch $RUN/data/done"
timed "random model" "$RUN/random/config.json" $PY scripts/toy_model.py --output_dir "$RUN/random" --seed "$SEED"

# Stage 0: the base VLM (plays Qwen2.5-VL-Instruct). Images are read by the vision tower, so it trains here.
# ALIGN=1: first the vision tower and projector alone learn to put each drawn character where the language
# model's embedding of that character is (as a real VLM's projector is aligned before instruction tuning).
INIT=random
if [ "$ALIGN" = 1 ] && [ ! -e "$RUN/base/config.json" ]; then  # (a run that reuses a base model skips it)
  INIT=aligned
  timed "stage 0a: vision aligned to text embeddings (toy_align.py)" "$RUN/aligned/config.json" \
    $PY scripts/toy_align.py --model "$RUN/random" --dataset "$RUN/data/sft/messages.jsonl" --output_dir "$RUN/aligned" \
      --steps "$ALIGN_STEPS" --seed "$SEED"
fi
FREEZE0=$([ "$STAGE0_VISION" = freeze ] && echo True || echo False)
timed "stage 0: base VLM (sft.py, text + image rows)" "$RUN/base/config.json" \
  $PY sft.py --model_name_or_path "$RUN/$INIT" --dataset "$RUN/data/sft/messages.jsonl" --output_dir "$RUN/base" \
    --max_steps "$BASE_STEPS" --per_device_batch_size 32 --learning_rate 1.5e-3 --lr_scheduler cosine \
    --warmup_ratio 0.04 --freeze_vision_tower "$FREEZE0" --freeze_projector "$FREEZE0" --gradient_checkpointing False \
    --max_length 512 --save_steps 0 --save_dtype float32 --seed "$SEED"

# Stage 1: text-only CoT SFT, vision tower and projector frozen (the paper freezes the vision encoder).
# The rows are data/sft/openthoughts.jsonl's, in the chat shape. Every stage asks the question alone
# (--prompt_template plain): a 2M-parameter model cannot find a problem behind the paper's long prompts.
# STAGE1=direct: the same problems with the answers only (the paper's non-CoT ablation).
STAGES="base"
if [ "$STAGE1" != none ]; then
  STAGES="$STAGES sft"
  timed "stage 1: text-only $([ "$STAGE1" = cot ] && echo CoT || echo "$STAGE1-answer") SFT (sft.py)" "$RUN/sft/config.json" \
    $PY sft.py --model_name_or_path "$RUN/base" --dataset "$RUN/data/sft/${STAGE1}_messages.jsonl" --output_dir "$RUN/sft" \
      --max_steps "$SFT_STEPS" --per_device_batch_size 32 --learning_rate "$SFT_LR" --lr_scheduler cosine \
      --warmup_ratio 0.05 --freeze_vision_tower True --freeze_projector True --gradient_checkpointing False \
      --max_length 512 --save_steps 0 --save_dtype float32 --seed "$SEED"
fi

# Stage 2: GRPO on text-only problems (paper: 8 generations, temperature 1, clip-higher, beta 1e-2).
if [ "$STAGE2" != none ]; then
  STAGES="$STAGES rl"
  timed "stage 2: text-only GRPO (rl.py --backend hf)" "$RUN/rl/config.json" \
    $PY rl.py --model_name_or_path "$RUN/$([ "$STAGE1" != none ] && echo sft || echo base)" \
      --dataset "$RUN/data/rl/orz_math.json" --output_dir "$RUN/rl" \
      --backend hf --max_steps "$RL_STEPS" --prompts_per_step "$RL_PROMPTS" --num_generations 8 \
      --max_response_length 128 --prompt_template plain --learning_rate "$RL_LR" --warmup_ratio 0.1 \
      --gradient_checkpointing False --save_steps 0 --save_dtype float32 --seed "$SEED"
fi

# Stage 3: greedy evaluation of each stage on held-out problems, as text and as images.
for stage in $STAGES; do
  timed "stage 3: evaluate $stage (evaluate.py)" "$RUN/eval/$stage/done" \
    $PY evaluate.py --model_name_or_path "$RUN/$stage" --benchmarks toy_text,toy_image \
      --data_dir "$RUN/data/eval" --output_dir "$RUN/eval/$stage" --backend hf --max_new_tokens 160 \
      --prompt_template plain --think_budget "$THINK_BUDGET" --num_samples 1 --temperature 0
  touch "$RUN/eval/$stage/done"  # evaluate.py writes summary.json after each benchmark: mark the end
done
# ... and sampled at temperature 1 (the reward GRPO raises), on the held-out text problems
for stage in $STAGES; do
  if [ "$stage" = base ] || [ "$T1_SAMPLES" = 0 ]; then continue; fi
  timed "stage 3: evaluate $stage sampled at T=1 (evaluate.py)" "$RUN/eval/${stage}_t1/done" \
    $PY evaluate.py --model_name_or_path "$RUN/$stage" --benchmarks toy_text \
      --data_dir "$RUN/data/eval" --output_dir "$RUN/eval/${stage}_t1" --backend hf --max_new_tokens 160 \
      --prompt_template plain --think_budget "$THINK_BUDGET" --num_samples "$T1_SAMPLES" --temperature 1.0 --seed "$SEED"
  touch "$RUN/eval/${stage}_t1/done"
done

# Distillation: rejection sampling from the SFT model on training problems (keeps verified samples only).
if [ "$STAGE1" != none ] && [ "$DISTILL_N" != 0 ]; then
  mkdir -p "$RUN/distill"
  timed "distill.py from the SFT model" "$RUN/distill/distill.jsonl.stats.json" \
    $PY distill.py --teacher "$RUN/sft" --dataset "$RUN/data/rl/orz_math.json" --output "$RUN/distill/distill.jsonl" \
      --backend hf --prompt_template plain --num_samples 4 --keep 1 --max_new_tokens 160 --temperature 1.0 --limit "$DISTILL_N" --seed "$SEED"
fi

echo "== report"
$PY scripts/toy_report.py --run_dir "$RUN" --probe_limit "$PROBE_LIMIT"
