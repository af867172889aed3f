"""A run folder belongs to one process at a time (dreambench/resilience/lock.py)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY, compose, run_cli

HOLD = ("import sys, time; from dreambench.resilience import lock; lock.acquire(sys.argv[1]); "
        "print('held', flush=True); time.sleep(120)")


class Loaded(Exception):
    """Raised in place of loading the model: the run got past every start-up check."""


def _no_model(monkeypatch) -> None:
    from dreambench.models import loading

    def refuse(*a, **k):
        raise Loaded
    monkeypatch.setattr(loading, "load_components", refuse)


@pytest.fixture
def holder(tmp_path):
    """Another live process holding <tmp>/run, as a run writing it would."""
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    yield run, p
    if p.poll() is None:
        p.kill()
        p.wait()


def _files(run: Path) -> dict[str, bytes]:
    return {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file()}


def test_second_run_into_a_live_folder_is_one_line_naming_the_owner(holder, monkeypatch):
    from dreambench.errors import UserError
    from dreambench.train import train
    run, p = holder
    (run / "metrics.csv").write_text("the live run's rows\n")
    before = _files(run)
    _no_model(monkeypatch)
    with pytest.raises(UserError, match=f"run folder {run} is in use by pid {p.pid} on host ") as e:
        train(compose(["+experiment=dog", *TINY, f"paths.run_dir={run}"]))
    assert "\n" not in str(e.value)
    assert _files(run) == before  # nothing written, the owner's lock file untouched


def test_cli_refuses_a_live_folder_with_exit_2_and_writes_nothing(holder):
    run, p = holder
    before = _files(run)
    r = run_cli("dreambench.train", ["+experiment=dog", *TINY, f"hydra.run.dir={run}"], timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"dreambench: error: run folder {run} is in use by pid {p.pid}")
    assert _files(run) == before and not (run / ".hydra").exists() and not (run / "train.log").exists()


def test_stale_lock_of_a_killed_run_is_taken_over_with_a_warning_and_released_on_error(holder, monkeypatch, caplog):
    from dreambench.resilience import lock
    from dreambench.train import train
    run, p = holder
    p.send_signal(signal.SIGKILL)  # dies holding it: the kernel drops the flock, the owner's line stays
    p.wait()
    assert (run / ".lock").read_text()
    _no_model(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="dreambench"), pytest.raises(Loaded):
        train(compose(["+experiment=dog", *TINY, f"paths.run_dir={run}"]))
    assert f"stale lock of pid {p.pid}" in caplog.text
    assert not lock.holds(run) and not (run / ".lock").exists()  # released although the run failed
    lock.acquire(run)  # and free for the next run
    lock.release(run)


def test_ddp_child_ranks_share_rank_0s_lock(holder, monkeypatch):
    from dreambench.resilience.runs import RUN_DIR_ENV
    from dreambench.train import train
    run, _ = holder  # stands for rank 0 of this launch
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(RUN_DIR_ENV, str(run))
    _no_model(monkeypatch)
    with pytest.raises(Loaded):  # not refused: past the lock to the model load
        train(compose(["+experiment=dog", *TINY, f"paths.run_dir={run}-not-used"]))
    assert os.path.exists(run / ".lock")  # rank 0's lock is not released by a child
