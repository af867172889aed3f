#!/usr/bin/env bash
# The paper's Tables 1, 3 and 4 from one set of runs, with one report: Table 1 (DreamBooth, Textual Inversion,
# the untrained model, real images), Table 3 (prior loss λ = 1 vs 0) and Table 4 (class noun correct / none /
# wrong). DreamBooth with λ = 1 and the correct noun is the same training in all three tables
# (conf/recipe/tables_dreambooth.yaml: table3_prior and table4_correct only relabel table1_dreambooth), so it is
# trained once: 5 trainings per subject and seed instead of 7. `make toy-tables` runs it on the toy world.
# Options: common.sh, and
#   JOBS=N   train and evaluate N groups of subjects side by side (subject i in group i mod N), each process on one
#            torch thread (OMP_NUM_THREADS=1): on a CPU, small models use two single-threaded processes better
#            than one process on two threads. Default 1 (make toy-tables: the usable cores, at most 2).
# Run folders: <OUT>/<row>/<subject>-s<seed>; the tables and report.html: <OUT>/tables/.
TABLE=tables
source "$(dirname "$0")/common.sh"
JOBS=${JOBS:-1}
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || { echo "tables: JOBS=$JOBS must be a whole number >= 1" >&2; exit 2; }
# Textual Inversion only where the model family has it (common.sh).
TI=0
if has_textual_inversion; then TI=1; fi

group() {  # group <subject,...>: every training of the three tables for these subjects, then their evaluation
  local SUBJECTS=$1 s  # what train and train_wrong read, for this group only
  train tables_dreambooth
  if [ "$TI" = 1 ]; then train table1_textual_inversion; fi
  train table3_no_prior
  train table4_none "data.class_noun=''"
  train_wrong
  # Seed 0 only: the base model does not depend on the training seed (as table1.sh).
  SEEDS=0 train table1_untrained trainer.max_steps=0
  local runs=()
  for s in ${SUBJECTS//,/ }; do runs+=("$OUT"/*/"$s"-s*); done
  "$PY" -m dreambench.evaluate mode=run "runs=[$(IFS=,; echo "${runs[*]}")]" ${EVAL[@]+"${EVAL[@]}"}
}

IFS=, read -r -a ALL <<< "$SUBJECTS"
if [ "$JOBS" -gt "${#ALL[@]}" ]; then JOBS=${#ALL[@]}; fi
if [ "$JOBS" = 1 ]; then
  group "$SUBJECTS"
else
  export OMP_NUM_THREADS=1
  mkdir -p "$OUT/logs"
  pids=()
  for ((j = 0; j < JOBS; j++)); do
    part=()
    for ((i = j; i < ${#ALL[@]}; i += JOBS)); do part+=("${ALL[$i]}"); done
    (group "$(IFS=,; echo "${part[*]}")") > "$OUT/logs/group$j.log" 2>&1 &
    pids+=($!)
    echo "tables: group $j (${part[*]}) -> $OUT/logs/group$j.log" >&2
  done
  failed=0
  for j in "${!pids[@]}"; do
    wait "${pids[$j]}" || { echo "tables: group $j failed; see $OUT/logs/group$j.log" >&2; failed=1; }
  done
  [ "$failed" = 0 ] || exit 1
fi
evaluate_real
"$PY" -m analysis.tables "$OUT"
