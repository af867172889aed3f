# Sourced by experiments/table*.sh: arguments, subjects, seeds and the smoke settings shared by the recipes.
#   --smoke        the tiny model, 2 subjects (dog, backpack), 20 steps, 2 prompts x 2 images: minutes on a CPU
#   OUT=...        where the table's run folders go (default experiments/<table>[-smoke])
#   SUBJECTS=a,b   subjects (default: all 30 of DreamBench; --smoke: dog,backpack)
#   SEEDS=0,1,2    training seeds (default 0)
#   PY=...         the Python to use (default .venv/bin/python, else python)
#   any other argument is passed to `python -m dreambench.train` as a Hydra override (e.g. trainer=gpu)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
SMOKE=0
EXTRA=()
for a in "$@"; do
  case "$a" in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d'; exit 0 ;;
    *) EXTRA+=("$a") ;;
  esac
done
SUFFIX=$([ "$SMOKE" = 1 ] && echo "-smoke" || true)
OUT=${OUT:-${DREAMBENCH_OUTPUT:-experiments}/${TABLE}${SUFFIX}}
SUBJECTS=${SUBJECTS:-$("$PY" -m analysis.recipes subjects $([ "$SMOKE" = 1 ] && echo --smoke))}
SEEDS=${SEEDS:-0}
if [ "$SMOKE" = 1 ]; then
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
# One folder per row and run: <OUT>/<row>/<subject>-s<seed>.
SWEEP=(hydra.sweep.dir="$OUT" 'hydra.sweep.subdir=${recipe.row}/${data.subject}-s${seed}')

train() {  # train <recipe,...> [overrides...]: the multirun over subjects x recipes x seeds
  local recipes=$1; shift
  echo "+ python -m dreambench.train -m +experiment=$SUBJECTS +recipe=$recipes seed=$SEEDS $*" >&2
  "$PY" -m dreambench.train -m "+experiment=$SUBJECTS" "+recipe=$recipes" "seed=$SEEDS" "${SWEEP[@]}" \
    ${TRAIN[@]+"${TRAIN[@]}"} "$@" ${EXTRA[@]+"${EXTRA[@]}"}
}

evaluate_rows() {  # evaluate_rows <row> ...: every run of those rows (any method's runs)
  local runs
  runs=$(printf "$OUT/%s," "$@")
  "$PY" -m dreambench.evaluate mode=run "runs=[${runs%,}]" ${EVAL[@]+"${EVAL[@]}"}
}

tables() {
  "$PY" -m analysis.tables "$OUT" --table "$TABLE"
}
