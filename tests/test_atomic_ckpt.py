"""Checkpoints are complete or absent: a writer killed with SIGKILL mid-save leaves the previous one loadable."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO

WRITER = r"""
import sys, torch
from pathlib import Path
from dreambench.resilience.checkpoint import AtomicCheckpointIO, checkpoint_step, find_latest_checkpoint
d = Path(sys.argv[1]); n = int(sys.argv[2])
io = AtomicCheckpointIO(keep=2)
last = find_latest_checkpoint(d)
step = checkpoint_step(last) if last else 0
while True:
    step += 1
    # every value of the checkpoint says which step wrote it: a mixed or torn file cannot pass for a whole one
    io.save_checkpoint({"global_step": step, "w": torch.full((n,), float(step)), "opt": [torch.full((n // 4,), float(step))]},
                       d / f"step={step:06d}.ckpt")
    print(step, flush=True)
"""


def _check_folder(d: Path) -> int:
    from dreambench.resilience.checkpoint import (
        checkpoint_step,
        find_latest_checkpoint,
        is_complete_checkpoint,
    )
    latest = find_latest_checkpoint(d)
    assert latest is not None, sorted(p.name for p in d.iterdir())
    for p in d.glob("step=*.ckpt"):  # every visible checkpoint is whole
        assert is_complete_checkpoint(p), p
        ck = torch.load(p, map_location="cpu", weights_only=True)
        step = checkpoint_step(p)
        assert ck["global_step"] == step and bool((ck["w"] == step).all()) and bool((ck["opt"][0] == step).all())
    # pruning runs only after a new file is complete: at most keep + 1 (a kill between rename and prune)
    assert len(list(d.glob("step=*.ckpt"))) <= 3
    return checkpoint_step(latest)


@pytest.mark.slow
def test_sigkill_during_saves_leaves_the_previous_checkpoint_loadable(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    last = 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(d), str(8 * 2**20)], stdout=subprocess.PIPE,
                                text=True, env=env)
        assert proc.stdout.readline().strip(), "writer did not save"  # one save done: now kill it mid-way
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        step = _check_folder(d)
        assert step > last  # progress survives every kill
        last = step
    # the killed writers' temporaries are cleaned by the next save once their process is gone
    from dreambench.resilience.checkpoint import AtomicCheckpointIO
    AtomicCheckpointIO(keep=2).save_checkpoint({"global_step": last + 1, "w": torch.full((4,), float(last + 1)),
                                                "opt": [torch.full((1,), float(last + 1))]},
                                               d / f"step={last + 1:06d}.ckpt")
    assert [p.name for p in d.iterdir() if p.name.startswith(".")] == []
    assert _check_folder(d) == last + 1


def test_failed_save_leaves_previous_checkpoint_and_no_temporary(tmp_path):
    from dreambench.resilience.checkpoint import AtomicCheckpointIO, find_latest_checkpoint
    io = AtomicCheckpointIO(keep=1)
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, tmp_path / "step=000001.ckpt")
    before = (tmp_path / "step=000001.ckpt").read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError)):  # which one depends on the object
        io.save_checkpoint({"global_step": 2, "bad": lambda: 0}, tmp_path / "step=000002.ckpt")  # unpicklable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=000001.ckpt"]
    assert (tmp_path / "step=000001.ckpt").read_bytes() == before
    assert find_latest_checkpoint(tmp_path).name == "step=000001.ckpt"


def test_pruning_keeps_the_newest_and_never_leaves_the_folder(tmp_path):
    from dreambench.resilience.checkpoint import AtomicCheckpointIO
    d = tmp_path / "checkpoints"
    outside = tmp_path / "precious.ckpt"
    io = AtomicCheckpointIO(keep=2)
    io.save_checkpoint({"global_step": 0}, outside)
    d.mkdir()
    (d / "step=000000.ckpt").symlink_to(outside)  # a link to a file elsewhere is not ours to delete
    for step in (1, 2, 3):
        io.save_checkpoint({"global_step": step}, d / f"step={step:06d}.ckpt")
    assert sorted(p.name for p in d.iterdir()) == ["step=000000.ckpt", "step=000002.ckpt", "step=000003.ckpt"]
    assert outside.is_file()
    with pytest.raises(ValueError):  # Lightning's remove_checkpoint path goes through safe_rmtree too
        io.remove_checkpoint(d / "step=000000.ckpt")
    io.remove_checkpoint(d / "step=000002.ckpt")
    assert not (d / "step=000002.ckpt").exists()


def test_trainer_checkpoints_are_weights_only_loadable(tmp_path):
    """What the run writes loads with torch.load(weights_only=True): no pickled code in a checkpoint."""
    from dreambench.resilience.checkpoint import AtomicCheckpointIO, capture_rng
    g = torch.Generator().manual_seed(1)
    state = {"global_step": 3, "dreambench_rng": {"ranks": [capture_rng(g)]}}
    AtomicCheckpointIO().save_checkpoint(state, tmp_path / "step=000003.ckpt")
    back = torch.load(tmp_path / "step=000003.ckpt", weights_only=True)
    assert back["dreambench_rng"]["ranks"][0]["numpy"][0] == "MT19937"
