# Sourced by experiments/table*.sh: arguments, subjects, seeds and the smoke settings shared by the recipes.
#   --smoke        the tiny model, 2 subjects (dog, backpack), 20 steps, 2 prompts x 2 images: minutes on a CPU
#   --toy          the toy world (docs/TOY_WORLD.md): model=toy, metrics=toy, its subjects, seeds 0,1,2, the toy
#                  rows' steps and learning rates (TOY_ROWS below); build it first: make toy-world
#   OUT=...        where the table's run folders go (default experiments/<table>[-smoke])
#   SUBJECTS=a,b   subjects (default: all 30 of DreamBench; --smoke: dog,backpack)
#   SEEDS=0,1,2    training seeds (default 0)
#   PY=...         the Python to use (default .venv/bin/python, else python)
#   EVAL_ARGS=...  more Hydra overrides for `python -m dreambench.evaluate` (space-separated, after the mode's own)
#   any other argument is passed to `python -m dreambench.train` as a Hydra override (e.g. trainer=gpu)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
SMOKE=0
TOY=0
EXTRA=()
for a in "$@"; do
  case "$a" in
    --smoke) SMOKE=1 ;;
    --toy) TOY=1 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d'; exit 0 ;;
    *) EXTRA+=("$a") ;;
  esac
done
SUFFIX=$([ "$SMOKE" = 1 ] && echo "-smoke" || true)
if [ "$TOY" = 1 ]; then
  SUFFIX=-toy
  # The world's folder is the data set of every step (subjects, prompts, the real-images row).
  DREAMBENCH_DATA=$("$PY" -m dreambench.world path world)
  export DREAMBENCH_DATA
fi
OUT=${OUT:-${DREAMBENCH_OUTPUT:-experiments}/${TABLE}${SUFFIX}}
SUBJECTS=${SUBJECTS:-$("$PY" -m analysis.recipes subjects $([ "$SMOKE" = 1 ] && echo --smoke))}
SEEDS=${SEEDS:-$([ "$TOY" = 1 ] && echo 0,1,2 || echo 0)}
declare -A TOY_ROWS=()
if [ "$TOY" = 1 ]; then
  # The paper's rows at the toy world's scale (docs/TOY_WORLD.md): DreamBooth as conf/preset/toy.yaml (300 steps,
  # lr 3e-4, 16 class images), Textual Inversion 300 steps at its own lr 5e-3 without accumulation. Every row gets
  # TRAIN; a recipe's own line in TOY_ROWS comes after it. Evaluation: all 25 prompts x 2 images, 8 PRES images,
  # 25 DDIM steps (50 until 2026-12-07: every score ~0.01 higher at 25, the differences between rows the same;
  # docs/TOY_WORLD.md), a subject's 58 images in 2 pipeline calls (the same images as 4 at a time, to float
  # rounding; ~25 % faster).
  TRAIN=(trainer.max_steps=300 optimizer.lr=3e-4 ++prior.num_images=16 train.samples=false
         train.checkpoint_every_n_steps=0 logger=none progress=false)
  TOY_ROWS[table1_textual_inversion]="trainer.accumulate_grad_batches=1 method.lr=5e-3"
  EVAL=(metrics=toy eval.images_per_prompt=2 eval.pres_images=8 eval.num_inference_steps=25 eval.batch_size=50
        eval.progress=false)
elif [ "$SMOKE" = 1 ]; then
  # ++prior.num_images: also accepted by prior=none rows (it ignores it).
  TRAIN=(model=tiny trainer.max_steps=20 trainer.accumulate_grad_batches=1 optimizer.lr=1e-3 ++prior.num_images=4
         guidance.num_inference_steps=4 train.samples=false train.checkpoint_every_n_steps=0 logger=none
         progress=false)
  EVAL=(metrics=tiny eval.prompts_limit=2 eval.images_per_prompt=2 eval.num_inference_steps=4 eval.pres_images=2
        eval.progress=false)
else
  TRAIN=()
  EVAL=()
fi
read -r -a EVAL_EXTRA <<< "${EVAL_ARGS:-}"
EVAL+=(${EVAL_EXTRA[@]+"${EVAL_EXTRA[@]}"})
# One folder per row and run: <OUT>/<row>/<subject>-s<seed>.
SWEEP=(hydra.sweep.dir="$OUT" 'hydra.sweep.subdir=${recipe.row}/${data.subject}-s${seed}')

train() {  # train <recipe,...> [overrides...]: the multirun over subjects x recipes x seeds; the overrides given
           # here define the row (a class noun, no training) and come last, after the table's and the user's
  local recipes=$1; shift
  if [ "$TOY" = 1 ] && [[ $recipes == *,* ]]; then  # rows with their own toy settings: one multirun per row
    local r
    for r in ${recipes//,/ }; do train "$r" "$@"; done
    return
  fi
  local row=()
  # shellcheck disable=SC2206 # TOY_ROWS values are space-separated Hydra overrides without spaces inside
  [ "$TOY" = 1 ] && [ -n "${TOY_ROWS[$recipes]:-}" ] && row=(${TOY_ROWS[$recipes]})
  echo "+ python -m dreambench.train -m +experiment=$SUBJECTS +recipe=$recipes seed=$SEEDS $*" >&2
  "$PY" -m dreambench.train -m "+experiment=$SUBJECTS" "+recipe=$recipes" "seed=$SEEDS" "${SWEEP[@]}" \
    ${TRAIN[@]+"${TRAIN[@]}"} ${row[@]+"${row[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} "$@"
}

evaluate_rows() {  # evaluate_rows <row> ...: every run of those rows (any method's runs)
  local runs
  runs=$(printf "$OUT/%s," "$@")
  "$PY" -m dreambench.evaluate mode=run "runs=[${runs%,}]" ${EVAL[@]+"${EVAL[@]}"}
}

has_textual_inversion() {  # the model family has Textual Inversion (SD 1.x/2.x, SDXL; not SD 3.5 or Flux);
                           # if not, says the row is left out (the table then says "no runs" for it)
  [ "$("$PY" -m analysis.recipes has-method textual_inversion ${TRAIN[@]+"${TRAIN[@]}"} \
        ${EXTRA[@]+"${EXTRA[@]}"})" = yes ] && return 0
  echo "$TABLE: this model family has no textual inversion; the row is left out" >&2
  return 1
}

train_wrong() {  # Table 4's wrong-class row: one run per subject, as the wrong class (another DreamBench class,
                 # `python -m analysis.recipes wrong-class`, seeded by WRONG_SEED) differs per subject
  local s
  for s in ${SUBJECTS//,/ }; do
    SUBJECTS=$s train table4_wrong "data.class_noun=$("$PY" -m analysis.recipes wrong-class "$s" --seed "${WRONG_SEED:-0}")"
  done
}

evaluate_real() {  # Table 1's "Real images" row: distinct pairs of each subject's own photos
  "$PY" -m dreambench.evaluate mode=real out_dir="$OUT/real" "subjects=[$SUBJECTS]" ${EVAL[@]+"${EVAL[@]}"}
}

tables() {
  "$PY" -m analysis.tables "$OUT" --table "$TABLE"
}
