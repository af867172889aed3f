"""Two processes (DDP over gloo on CPU): one run folder, one checkpoint, one set of samples, class images split
across ranks, and rank 1 writes nothing of its own."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import TINY, run_cli


def test_child_ranks_take_the_run_folder_of_rank_0(monkeypatch, tmp_path):
    from dreambench.resilience.runs import RUN_DIR_ENV, launch_rank, run_dir_for_this_rank
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "rank0-dir"))
    assert launch_rank() == 0 and run_dir_for_this_rank(tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.setenv("LOCAL_RANK", "1")  # what Lightning's launcher sets for the re-run child
    assert launch_rank() == 1 and run_dir_for_this_rank(tmp_path / "mine") == tmp_path / "rank0-dir"


@pytest.mark.slow
def test_two_process_ddp_run_writes_one_run_folder(tmp_path):
    out = tmp_path / "out"
    seed = random.Random().randrange(10**6)  # a class-image cache miss: both ranks must render their share
    args = ["+experiment=dog", *[o for o in TINY if not o.startswith(("trainer.max_steps", "prior.num_images"))],
            "trainer=ddp_cpu", "trainer.max_steps=4", "prior.num_images=4", f"prior.seed={seed}",
            "train.checkpoint_every_n_steps=4", f"paths.output_dir={out}"]  # run folder from ${now:...}
    r = run_cli("dreambench.train", args, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    runs = list((out / "dog").iterdir())
    assert len(runs) == 1, runs  # rank 1 re-ran the command (and its ${now:}) but made no folder
    run = runs[0]
    assert sorted(p.name for p in out.rglob("*") if p.name.startswith((".pl_hydra", "train_ddp_process"))) == []
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "README.md", "checkpoints", "config.yaml", "logs",
                                                    "metrics.json", "model", "samples", "train.log"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step=000004.ckpt"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "before_after.png", "step_000000.png", "step_000004.png"]
    logs = r.stdout + r.stderr
    assert "rank 0 of 2 renders 2 of 4" in logs and "rank 1 of 2 renders 2 of 4" in logs
    ck = torch.load(run / "checkpoints" / "step=000004.ckpt", weights_only=True)
    ranks = ck["dreambench_rng"]["ranks"]  # each rank's own noise stream, for an exact resume under DDP
    assert len(ranks) == 2 and not torch.equal(ranks[0]["noise"], ranks[1]["noise"])
    import json
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4
