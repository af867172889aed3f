#!/usr/bin/env bash
# Table 4 of DreamBooth: the class noun in the prompt — correct, none ("a sks in the jungle") and wrong (another
# DreamBench class, drawn per subject with a fixed seed: `python -m analysis.recipes wrong-class <subject>`).
# DreamBooth on Stable Diffusion (the paper: Imagen, 5 subjects; here all 30 unless SUBJECTS=...).
# `make table4` / `make table4-smoke`. Options: common.sh (WRONG_SEED=0 picks the wrong classes).
TABLE=table4
source "$(dirname "$0")/common.sh"
train table4_correct
train table4_none "data.class_noun=''"
train_wrong
evaluate_rows correct none wrong
tables
