#!/usr/bin/env bash
# Table 1 of DreamBooth (Ruiz et al., CVPR 2023): DreamBooth vs Textual Inversion on Stable Diffusion, all 30
# DreamBench subjects, 25 prompts x 4 images each, plus the "Real images" row. `make table1` (GPU, real SD
# weights) or `make table1-smoke` / `experiments/table1.sh --smoke` (tiny model, CPU, minutes).
# Recipes: conf/recipe/table1_dreambooth.yaml, conf/recipe/table1_textual_inversion.yaml. Options: common.sh.
TABLE=table1
source "$(dirname "$0")/common.sh"
train table1_dreambooth,table1_textual_inversion
evaluate_rows dreambooth textual_inversion
"$PY" -m dreambench.evaluate mode=real out_dir="$OUT/real" "subjects=[$SUBJECTS]" ${EVAL[@]+"${EVAL[@]}"}
tables
