"""One run folder per run, whatever the number of processes and however often it is resumed."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L

from dreambench.utils.io import atomic_write_text

log = logging.getLogger("dreambench")

# Lightning's DDP launcher (strategy=ddp, not spawn) re-runs `python -m dreambench.train <same args>` once per
# extra rank, and Hydra composes the config again there: `${now:...}` in the run folder's name would resolve to
# another second. Lightning appends `hydra.run.dir=<rank 0's dir>` to the child's command, which covers a single
# run but not a multirun (it passes `run.dir`, not the sweep folder; a known upstream issue). So rank 0 puts the
# run folder it resolved into this variable just before `trainer.fit` starts the children (who inherit it), and
# a child (LOCAL_RANK > 0) takes the folder from there instead of its own config.
RUN_DIR_ENV = "DREAMBENCH_RUN_DIR"


def launch_rank() -> int:
    """This process's rank as the launcher set it, before any Trainer exists (0 in a single-process run)."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        v = os.environ.get(var)
        if v and v.isdigit():
            return int(v)
    return 0


def run_dir_for_this_rank(configured: str | Path) -> Path:
    if launch_rank() > 0 and os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    return Path(configured)


# Settings that shape the optimisation itself: changed on resume, the run is no longer the uninterrupted run of
# either setting (guarantee 1 holds only without a change). Warned, not refused: lowering the learning rate of a
# run that diverged is a legitimate use. trainer.max_steps is not here: raising it is how a run is extended.
RESUME_SENSITIVE = ("optimizer.lr", "method.lr", "model.text_encoder_lr", "prior.weight", "train.lr_scheduler",
                    "train.lr_warmup_steps", "optimizer.weight_decay", "data.resolution", "seed")


def warn_changed_settings(checkpoint: Path, cfg: Any) -> list[str]:
    """Name the RESUME_SENSITIVE settings that differ between the run that wrote `checkpoint` (its
    <run>/config.yaml) and this one; returns the warnings given."""
    from omegaconf import OmegaConf
    saved = Path(checkpoint).parent.parent / "config.yaml"
    if not saved.is_file():
        return []
    old = OmegaConf.load(saved)
    changed = [f"{k} {OmegaConf.select(old, k)} -> {OmegaConf.select(cfg, k)}" for k in RESUME_SENSITIVE
               if OmegaConf.select(old, k) != OmegaConf.select(cfg, k)]
    if changed:
        log.warning("resuming %s with changed settings: %s (the result equals no uninterrupted run)",
                    checkpoint, ", ".join(changed))
    return changed


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def continue_csv_logs(loggers: list[Any], resume_step: int, log_every_n_steps: int = 1) -> None:
    """Lightning's CSVLogger deletes an existing metrics.csv when its writer starts: a resumed run would lose the
    losses of the steps before the checkpoint. Keep the rows logged before `resume_step` (rows at or after it
    were logged after that checkpoint by the run that was interrupted; the resumed run logs them again) and hand
    them to the new writer, which appends from there."""
    from lightning.pytorch.loggers import CSVLogger
    for lg in loggers:
        if not isinstance(lg, CSVLogger):
            continue
        path = Path(lg.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        keys, rows = _read_rows(path)
        # A row's "step" is the number of steps done before the logged one (the row of step k says k - 1).
        # Lightning also logs when a run is stopped, so an interrupted run's last row may be off the
        # log_every_n_steps grid; the uninterrupted run has no such row, so it is dropped.
        last = resume_step - 1
        kept = [r for r in rows if r.get("step", "") != "" and (int(float(r["step"])) < last or (
            int(float(r["step"])) == last and resume_step % max(1, log_every_n_steps) == 0))]
        exp = lg.experiment  # creating the writer deletes the old file
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(kept)
        atomic_write_text(path, buf.getvalue())
        exp.metrics_keys = list(keys)
        log.info("metrics.csv: kept %d rows logged before step %d", len(kept), resume_step)


class FlushLoggersOnCheckpoint(L.Callback):
    """CSVLogger buffers rows (100 steps by default): flush them whenever a checkpoint is written, so the log
    on disk always reaches at least the newest checkpoint, and a resume after a hard kill loses no row."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.save()


@contextlib.contextmanager
def redacted_argv():
    """sys.argv with the values of secret-named overrides replaced, for the duration of the block (W&B copies
    sys.argv into its run metadata). Restored after: Lightning's DDP launcher re-runs the real command line."""
    from dreambench.resilience.hydra_redact import redact_override
    saved = list(sys.argv)
    sys.argv[:] = [saved[0]] + [redact_override(a) for a in saved[1:]]
    try:
        yield
    finally:
        sys.argv[:] = saved
