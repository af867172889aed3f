"""Preemption: SIGTERM / SIGUSR1 ask the run to stop; it saves a checkpoint at the next optimizer-step boundary,
ends the fit normally (loggers flush) and the entry point exits with RESUMABLE_EXIT_CODE, after `scontrol requeue`
under Slurm.

Why not Lightning's own handling: with `SLURMEnvironment(auto_requeue=True)` Lightning saves an `hpc_ckpt_N.ckpt`
*inside* the SIGUSR1 handler (a save from a signal handler can hang or interleave with the step that was running;
ECOSYSTEM.md), outside our checkpoints folder and naming, so `resume=auto` would not see it; and on SIGTERM its
notifier kills the DDP children at once and does a collective from inside the handler. Here the handler only sets
a flag; train.py turns Lightning's requeue off (`SLURMEnvironment(auto_requeue=False)` when Slurm is detected) and
this callback replaces Lightning's SIGTERM handler from on_train_start (Lightning installs its own just before).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L

from dreambench.resilience.checkpoint import checkpoint_name

log = logging.getLogger("dreambench")

# 0 done, 2 bad input (UserError), 3 preempted: a checkpoint was saved, run again with resume=auto to continue,
# 4 stopped on a non-finite loss or gradient. 3 is not used by Python itself nor by Slurm.
RESUMABLE_EXIT_CODE = 3
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption(L.Callback):
    def __init__(self, checkpoint_dir: str | Path):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.requested: int | None = None  # the first signal received
        self.checkpoint: Path | None = None  # set once the preemption checkpoint is on disk
        self._previous: dict[int, Any] = {}

    @property
    def preempted(self) -> bool:
        return self.checkpoint is not None

    def _handler(self, signum, frame) -> None:
        # Only a flag: no I/O, logging or collectives here. A second signal (during the save, say) finds the flag
        # already set and changes nothing; the save itself is an atomic rename (AtomicCheckpointIO).
        if self.requested is None:
            self.requested = signum

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption signals not handled: training runs outside the main thread")
            return
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handler)

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.install()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % max(1, int(trainer.accumulate_grad_batches)):
            return  # mid-accumulation: the optimizer step (and the state to save) is not complete yet
        asked = self.requested is not None
        if trainer.world_size > 1:  # a signal may reach one rank only; all must save and stop together
            asked = trainer.strategy.reduce_boolean_decision(asked, all=False)
        if not asked or self.checkpoint is not None:
            return
        path = self.checkpoint_dir / checkpoint_name(trainer.global_step)
        trainer.save_checkpoint(path)  # every rank takes part; rank 0 writes (AtomicCheckpointIO)
        self.checkpoint = path
        name = signal.Signals(self.requested).name if self.requested else "a signal on another rank"
        log.warning("preemption (%s): checkpoint %s saved at step %d; stopping (exit code %d, resume=auto continues)",
                    name, path, trainer.global_step, RESUMABLE_EXIT_CODE)
        trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self.uninstall()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.uninstall()


def requeue_slurm() -> bool:
    """`scontrol requeue <job>` when running under Slurm with scontrol on PATH; True if it was requeued."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    exe = shutil.which("scontrol")
    if not job or not exe:
        return False
    if not re.fullmatch(r"[0-9_]+", job):
        log.warning("not requeueing: unexpected SLURM job id %r", job)
        return False
    r = subprocess.run([exe, "requeue", job], capture_output=True, text=True, timeout=120, check=False)
    if r.returncode:
        log.warning("scontrol requeue %s failed (%d): %s", job, r.returncode, r.stderr.strip())
        return False
    log.warning("requeued Slurm job %s", job)
    return True
