#!/usr/bin/env bash
# The paper's ablations in miniature, on several seeds, each reusing its seed's main run (scripts/toy.sh):
#
#   bash scripts/toy_ablations.sh     # SEEDS="0 1 2", 2 runs at a time; ~1.5 h on 2 cores
#                                     # writes runs/toy_ablations/{summary.json,report.md,ablations.png}
#
# Per seed S the main run is runs/toy (S = 0) or runs/toy_seedS (made here if missing: base, CoT SFT,
# CoT SFT + GRPO). Next to it, in <main run>/ablations/, with the main run's data and base model:
#   direct       stage 1 on the same text problems with the answer only, no chain of thought (paper: the
#                CoT model transfers, the non-CoT one does not); no RL
#   no_misread   stage 1 from a teacher that never misreads the problem (MISREAD_RATE=0): its chains never
#                have a reason to work from their own restatement rather than from the question; no RL
#   rl_only      GRPO from the base model, no SFT (SFT only and SFT + RL are the main run's stages 1 and 2)
#   forced_exit  the main run's SFT and SFT + RL models evaluated with "</think>" forced after
#                THINK_BUDGET thinking tokens (the paper's forced exit; the main run's evaluation has it off)
# Every toy.sh variable (sizes, QUESTION_FORMS, ...) passes through to every run.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
SEEDS=${SEEDS:-"0 1 2"}
JOBS=${JOBS:-2}                      # seeds run at once (each process uses one thread)
OUT=${OUT_DIR:-runs/toy_ablations}
MAIN=${MAIN_RUN:-runs/toy}           # seed 0's main run; seed S's is ${MAIN}_seedS
ABLATIONS=${ABLATIONS:-"direct no_misread rl_only forced_exit"}
THINK_BUDGET_ABLATION=${THINK_BUDGET_ABLATION:-128}  # forced exit at 128 of the 160 new tokens (chains: ~60)
mkdir -p "$OUT"

main_run() { if [ "$1" = 0 ]; then echo "$MAIN"; else echo "${MAIN}_seed$1"; fi; }

variant() {  # variant MAIN NAME SHARED [VAR=VALUE...]: toy.sh in MAIN/ablations/NAME with MAIN's SHARED folders
  local main=$1 name=$2 shared=$3; shift 3
  local dir=$main/ablations/$name
  mkdir -p "$dir"
  for x in $shared; do ln -sfn "$(realpath "$main/$x")" "$dir/$x"; done
  env "$@" RUN_DIR="$dir" T1_SAMPLES=0 DISTILL_N=0 bash scripts/toy.sh > "$dir/toy.log" 2>&1 \
    || { echo "ablation $dir failed: see $dir/toy.log" >&2; touch "$OUT/$name.$(basename "$main").failed"; return 1; }
  echo "== $dir done"
}

job() {  # job SEED WHAT: one run; an ablation first waits for its seed's main run to finish
  local seed=$1 what=$2 main
  main=$(main_run "$seed")
  if [ "$what" = main ]; then
    SEED=$seed RUN_DIR=$main bash scripts/toy.sh > "$OUT/seed$seed.log" 2>&1 \
      || { echo "main run $main failed: see $OUT/seed$seed.log" >&2; touch "$OUT/seed$seed.failed"; return 1; }
    touch "$OUT/seed$seed.done"
    echo "== $main done"
    return
  fi
  while [ ! -e "$OUT/seed$seed.done" ]; do
    if [ -e "$OUT/seed$seed.failed" ]; then return 1; fi
    sleep 10
  done
  case $what in
    direct) variant "$main" direct "data random base" SEED="$seed" STAGE1=direct STAGE2=none ;;
    # its own data (the same seed writes the same stage-0 rows, so the base model is shared)
    no_misread) variant "$main" no_misread "random base" SEED="$seed" MISREAD_RATE=0 STAGE2=none ;;
    rl_only) variant "$main" rl_only "data random base" SEED="$seed" STAGE1=none ;;
    forced_exit)  # the main run's trained models, evaluated with forced exit on
      variant "$main" forced_exit "data random base sft rl" SEED="$seed" THINK_BUDGET="$THINK_BUDGET_ABLATION" \
        PROBE_LIMIT=0 ;;
  esac
}

rm -f "$OUT"/*.done "$OUT"/*.failed
# every seed's main run first, then the ablations (longest first), JOBS at a time
queue=()
for seed in $SEEDS; do queue+=("$seed main"); done
for what in $ABLATIONS; do for seed in $SEEDS; do queue+=("$seed $what"); done; done
for item in "${queue[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  job $item &
done
wait
if ls "$OUT"/*.failed > /dev/null 2>&1; then echo "some runs failed (see the messages above)" >&2; exit 1; fi

runs=()
for seed in $SEEDS; do runs+=("$(main_run "$seed")"); done
$PY scripts/toy_ablation_report.py --out_dir "$OUT" --runs "${runs[@]}"
