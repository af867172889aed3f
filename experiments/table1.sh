#!/usr/bin/env bash
# Table 1 of DreamBooth (Ruiz et al., CVPR 2023): DreamBooth vs Textual Inversion on Stable Diffusion, all 30
# DreamBench subjects, 25 prompts x 4 images each, plus the "Real images" row and the untrained model (not in
# the paper: the base model with no training step, one seed, the floor both methods must rise above). On SDXL,
# SD 3.5 and Flux (model=sdxl|sd35|flux) also DreamBooth-LoRA with the family's recipe (not in the paper).
# `make table1` (GPU, real SD weights) or `make table1-smoke` / `experiments/table1.sh --smoke` (tiny model, CPU).
# Recipes: conf/recipe/table1_{dreambooth,textual_inversion,untrained}.yaml. Options: common.sh.
TABLE=table1
source "$(dirname "$0")/common.sh"
# Textual Inversion only where the model family has it (common.sh).
ROWS=(dreambooth)
if has_textual_inversion; then ROWS+=(textual_inversion); fi
RECIPES=$(printf 'table1_%s,' "${ROWS[@]}" | sed 's/,$//')
# DreamBooth-LoRA (not in the paper) where the family has a LoRA recipe (SDXL, SD 3.5, Flux): conf/recipe/lora_*.yaml.
LORA=$("$PY" -m analysis.recipes lora-recipe ${TRAIN[@]+"${TRAIN[@]}"} ${EXTRA[@]+"${EXTRA[@]}"})
if [ -n "$LORA" ]; then
  RECIPES+=",$LORA"
  ROWS+=(lora)
fi
train "$RECIPES"
# Seed 0 only: the base model does not depend on the training seed. max_steps=0 again on the command line,
# as the recipe says: --toy and --smoke set trainer.max_steps for every row, and a command-line value wins.
SEEDS=0 train table1_untrained trainer.max_steps=0
evaluate_rows "${ROWS[@]}" untrained
evaluate_real
tables
