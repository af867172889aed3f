"""Preemption: a real SIGTERM (then SIGUSR1, during the save) to `python -m dreambench.train`, a resumable exit
code, `scontrol requeue` under Slurm, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY

STEPS = 20
ARGS = ["+experiment=dog", *TINY, f"trainer.max_steps={STEPS}", f"train.checkpoint_every_n_steps={STEPS}",
        "train.export_model=false", "trainer.log_every_n_steps=3"]


def test_handler_only_sets_a_flag_and_restores_the_previous_handlers():
    from dreambench.resilience.preempt import Preemption
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    p = Preemption("unused")
    p.install()
    try:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGUSR1)  # a second signal changes nothing
        assert p.requested == signal.SIGTERM and not p.preempted
    finally:
        p.uninstall()
    assert {s: signal.getsignal(s) for s in before} == before


def test_requeue_calls_scontrol_only_under_slurm(tmp_path, monkeypatch):
    from dreambench.resilience.preempt import requeue_slurm
    record = _fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert requeue_slurm() is False and not record.exists()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert requeue_slurm() is True and record.read_text().split() == ["requeue", "4242"]
    monkeypatch.setenv("SLURM_JOB_ID", "42; rm -rf /")  # never passed on to a command
    assert requeue_slurm() is False


def _fake_scontrol(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "scontrol-args.txt"
    script = bin_dir / "scontrol"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {record}\n")
    script.chmod(0o755)
    return record


def _start(run: Path, extra: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dreambench.train", *ARGS, f"hydra.run.dir={run}", *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _weights(run: Path) -> dict:
    from dreambench.resilience.checkpoint import AtomicCheckpointIO
    ckpt = AtomicCheckpointIO().load_checkpoint(run / "checkpoints" / f"step={STEPS:06d}.ckpt")
    return {"state_dict": ckpt["state_dict"], "opt": ckpt["optimizer_states"][0]["state"]}


@pytest.mark.slow
def test_sigterm_saves_exits_resumable_requeues_and_resumes_exactly(tmp_path):
    record = _fake_scontrol(tmp_path)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    run = tmp_path / "run"
    proc = _start(run, [], env)
    first_grid = run / "samples" / "step_000000.png"  # training has started (handlers are in place before it)
    deadline = time.time() + 300
    while not first_grid.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)  # a second signal, most likely during the save
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    assert "preempted at step" in err and "resume=auto" in err
    assert record.read_text().split() == ["requeue", "4242"]
    (ckpt,) = list((run / "checkpoints").glob("step=*.ckpt"))
    k = int(ckpt.stem.split("=")[1])
    assert 0 < k < STEPS, "the signal should have arrived mid-run"
    assert not (run / "metrics.json").exists()
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporaries left

    # The requeued job runs the same command with resume=auto and continues in the same folder.
    r = _start(run, ["resume=auto"], {**os.environ})
    out, err = r.communicate(timeout=300)
    assert r.returncode == 0, err[-3000:]
    assert (run / "metrics.json").is_file() and f"run folder: {run}" in out

    ref = tmp_path / "ref"
    u = _start(ref, [], {**os.environ})
    _, err = u.communicate(timeout=300)
    assert u.returncode == 0, err[-3000:]
    a, b = _weights(run), _weights(ref)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][n], b["state_dict"][n]) for n in a["state_dict"])
    assert all(torch.equal(a["opt"][i]["exp_avg"], b["opt"][i]["exp_avg"]) for i in a["opt"])
    assert (run / "logs" / "metrics.csv").read_text() == (ref / "logs" / "metrics.csv").read_text()
