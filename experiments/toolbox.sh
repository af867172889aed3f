#!/usr/bin/env bash
# The training toolbox's evidence (docs/TOOLBOX.md; not a table of the paper): DreamBooth with every switch off,
# then with one switch on per row (min-SNR-γ, offset noise, input perturbation, EMA, caption dropout, masked loss),
# same subjects, seeds, steps and learning rate; each switch's effect on DINO, CLIP-I, CLIP-T and PRES as the paired
# difference per (subject, seed) run with its interval. `make toolbox-toy` (the toy world, a CPU) or
# `experiments/toolbox.sh --smoke`. Recipes: conf/recipe/toolbox_*.yaml. Options: common.sh.
TABLE=toolbox
source "$(dirname "$0")/common.sh"
ROWS=(baseline min_snr noise_offset input_perturbation ema caption_dropout mask)
recipes=$(printf "toolbox_%s," "${ROWS[@]}")
train "${recipes%,}"
evaluate_rows "${ROWS[@]}"
tables
