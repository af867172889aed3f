"""Shared by tests/test_methods*.py and tests/test_tables*.py: composing a tiny-model training config."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
DATASET = REPO.parent / "shared" / "dreambench-dataset"


def env_defaults(tmp_root: Path) -> None:
    # tests/conftest.py (the lead's) sets these for the session; standalone runs get the shared data set and a
    # cache of their own.
    os.environ.setdefault("DREAMBENCH_DATA", str(DATASET))
    os.environ.setdefault("DREAMBENCH_CACHE", str(tmp_root / "cache"))


def tiny_cfg(run_dir: Path, *overrides: str, subject: str = "dog"):
    base = [
        f"+experiment={subject}",
        "model=tiny",
        "+preset=smoke",
        "logger=none",
        "prior=none",
        "progress=false",
        f"paths.run_dir={run_dir}",
        "trainer.max_steps=6",
        "train.sample_every_n_steps=0",
        "train.checkpoint_every_n_steps=0",
        "guidance.num_inference_steps=2",
        "train.sample_seeds=[0]",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=base + list(overrides))


def render(pipe, prompt: str, seed: int = 0, steps: int = 3) -> np.ndarray:
    import torch

    return pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=7.5,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
