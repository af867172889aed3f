"""Test session set-up: the real DreamBench data, a private cache (tiny model, class images), no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SHARED_DATA = REPO.parent / "shared" / "dreambench-dataset"

os.environ.setdefault("DREAMBENCH_DATA", str(SHARED_DATA))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    # One cache per test worker: the tiny model is built once per worker and loaded like a real model.
    if "DREAMBENCH_TEST_CACHE" in os.environ:
        os.environ["DREAMBENCH_CACHE"] = os.environ["DREAMBENCH_TEST_CACHE"]
    else:
        os.environ["DREAMBENCH_CACHE"] = str(tmp_path_factory.mktemp("dreambench-cache"))
    yield


@pytest.fixture(scope="session")
def dataset_root() -> Path:
    root = Path(os.environ["DREAMBENCH_DATA"])
    if not (root / "prompts_and_classes.txt").is_file():
        pytest.fail(f"DreamBench data set not found at {root}: set DREAMBENCH_DATA")
    return root


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from dreambench.models.tiny import ensure_tiny_model
    from helpers import compose
    return ensure_tiny_model(compose(["+experiment=dog", "model=tiny"]).model.pretrained)
