#!/usr/bin/env bash
# Table 3 of DreamBooth: the prior-preservation loss, λ = 1 vs λ = 0, DreamBooth on Stable Diffusion (the paper:
# Imagen, 15 subjects; here all 30 unless SUBJECTS=...). PRES and DIV are scored too (DIV needs LPIPS weights:
# docs/EVALUATION.md). `make table3` / `make table3-smoke`. Options: common.sh.
TABLE=table3
source "$(dirname "$0")/common.sh"
train table3_prior,table3_no_prior
evaluate_rows with_prior no_prior
tables
