"""The trial side of a sweep, inside `train(cfg)` when `sweep.trial` is set: who ran the trial, and pruning.

Pruning: optuna-integration's PyTorchLightningPruningCallback fails with "Expected a parent" when
`pytorch_lightning` and `lightning.pytorch` imports are mixed (shared/docs/ECOSYSTEM.md), so this is the small
callback it would be: report the monitored value whenever the trainer holds a new one (the drift callback logs
val/* every few hundred steps; train/* changes every step) and stop the trial when the pruner says so. The
pruner runs here, in the trial's process, on the intermediate values of all trials in the shared storage.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import lightning as L
import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dreambench.sweep.objective import Objective
from dreambench.sweep.study import open_storage, storage_url, trial_id

log = logging.getLogger("dreambench.sweep")


class TrialPruning(L.Callback):
    def __init__(self, trial: optuna.trial.Trial, objective: Objective, run_dir: Path | None = None):
        assert objective.single, "Optuna prunes single-objective studies only"
        self.trial, self.objective, self.run_dir = trial, objective, run_dir
        self._last: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int):
        cm = trainer.callback_metrics
        if not all(k in cm for k in self.objective.metrics):
            return
        try:
            value = self.objective.values([float(cm[k]) for k in self.objective.metrics])[0]
        except ValueError:  # NaN: left to the end of the trial, where it fails with its reason
            return
        if value == self._last:
            return
        self._last = value
        step = int(trainer.global_step)
        self.trial.report(value, step)
        if self.trial.should_prune():
            msg = f"at step {step}: {'+'.join(self.objective.metrics)} = {value:.6g}"
            if self.run_dir is not None:
                from dreambench.utils.io import atomic_write_json
                atomic_write_json(self.run_dir / "pruned.json", {"step": step, "value": value,
                                                                  "metrics": list(self.objective.metrics)})
            # Raised out of fit(): the trial's job ends with TrialPruned, which the sweeper tells as PRUNED.
            raise optuna.TrialPruned(msg)


def trial_callbacks(cfg: DictConfig, run_dir: Path) -> list[L.Callback]:
    """Record where the trial runs (pid, host, run folder) and, for one objective with a pruner, prune."""
    s = cfg.sweep
    url = s.storage
    if not url:
        from hydra.core.hydra_config import HydraConfig
        url = storage_url(None, HydraConfig.get().sweep.dir)
    storage = open_storage(storage_url(url, "."))
    tid = trial_id(storage, str(s.study_name), int(s.trial))
    for key, value in (("pid", os.getpid()), ("host", socket.gethostname()), ("run_dir", str(run_dir))):
        storage.set_trial_user_attr(tid, key, value)
    objective = Objective.build(OmegaConf.to_container(cfg.optimized_metric) if OmegaConf.is_config(
        cfg.optimized_metric) else cfg.optimized_metric, list(s.directions), s.weights and list(s.weights))
    if not s.get("pruner") or not objective.single:
        return []
    study = optuna.load_study(study_name=str(s.study_name), storage=storage, pruner=instantiate(s.pruner))
    return [TrialPruning(optuna.trial.Trial(study, tid), objective, run_dir)]
