"""The study loop behind `python -m dreambench.train -m +hparams_search=lr_prior` (hydra/sweeper=optuna).

Why our own sweeper: the published hydra-optuna-sweeper (1.3.0, the newest) pins optuna<3, whose RDB storage
fails with SQLAlchemy 2, re-runs a full `n_trials` on every start, leaves killed trials RUNNING and stops on the
first failed trial (shared/docs/ECOSYSTEM.md). This one uses current Optuna's ask/tell API and hands each batch
of trials to whatever Hydra launcher is configured (basic: one after another in this process; submitit_local:
separate processes at once; submitit_slurm: Slurm jobs), so the trials are ordinary Hydra jobs with their own
run folders. The plugin shell Hydra discovers is hydra_plugins/dreambench_optuna_sweeper.

Semantics (docs/SWEEPS.md):
- `n_trials` is the study's target, not a number to add: a re-run continues up to it (stale retries and
  surplus trials do not count, failed ones do);
- a failed trial (exception, NaN, missing metric) is recorded FAIL with its reason (user attr `fail_reason`) and
  the study goes on, until more than `max_failure_rate * n_trials` trials have failed;
- a configuration error stops the sweep with that error, exit code 2: checked once before any trial (the task's
  `preflight` on the config of the first trials and the search space's corners), and should a trial still raise
  one, it is recorded but not counted, so the fixed command goes on where the study was;
- several sweepers may share one storage (journal file or PostgreSQL): each asks trials while the study is
  short of its target, and a trial asked past the target in a race is marked surplus and not run.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn
from hydra.errors import HydraException
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.trial import Trial, TrialState

from dreambench.sweep import space as space_mod
from dreambench.sweep.objective import Objective, ObjectiveError
from dreambench.sweep.study import (
    CONFIG_ERROR,
    FAIL_REASON,
    OWNER,
    STALE,
    SURPLUS,
    Heartbeat,
    counted,
    fail_trial,
    failed,
    open_storage,
    recover_stale,
    storage_url,
    this_process,
    trial_id,
)

log = logging.getLogger("dreambench.sweep")


class SweepStopped(HydraException):
    """The failure budget is spent: one line for the user, the study stays as it is."""


class SweepConfigError(HydraException):
    """The sweep's configuration is wrong (the sweeper's settings, or the trials' config): one line, exit 2."""


class OptunaSweep:
    def __init__(self, study_name: str, metrics: str | Sequence[str], directions: str | Sequence[str],
                 n_trials: int = 20, n_jobs: int = 1, params: Mapping[str, str] | None = None,
                 storage: str | None = None, weights: Sequence[float] | None = None,
                 sampler: Mapping[str, Any] | None = None, max_failure_rate: float = 0.25,
                 heartbeat_s: float = 30.0, stale_after_s: float = 300.0,
                 enqueue: Sequence[Mapping[str, Any]] | None = None, preflight: str | None = None):
        if not study_name:
            raise SweepConfigError("hydra.sweeper.study_name is empty (set sweep.study_name)")
        if int(n_trials) < 1 or int(n_jobs) < 1:
            raise SweepConfigError(f"hydra.sweeper: n_trials={n_trials} and n_jobs={n_jobs} must be >= 1")
        if not 0.0 <= float(max_failure_rate) <= 1.0:
            raise SweepConfigError(f"hydra.sweeper.max_failure_rate={max_failure_rate} must be within [0, 1]")
        try:
            self.objective = Objective.build(_plain(metrics), _plain(directions), _plain(weights))
        except ValueError as e:
            raise SweepConfigError(str(e)) from None
        self.preflight = preflight
        self.study_name, self.storage = str(study_name), storage
        self.n_trials, self.n_jobs = int(n_trials), int(n_jobs)
        self.params = _plain(params) or {}
        self.sampler_cfg = _plain(sampler)
        self.max_failure_rate = float(max_failure_rate)
        self.heartbeat_s, self.stale_after_s = float(heartbeat_s), float(stale_after_s)
        self.enqueue = _plain(enqueue) or []
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    # ---- the study ------------------------------------------------------------------------------------
    def open(self, sweep_dir: Path) -> tuple[optuna.Study, optuna.storages.BaseStorage, str]:
        url = storage_url(self.storage, sweep_dir)
        storage = open_storage(url)
        study = optuna.create_study(storage=storage, study_name=self.study_name, load_if_exists=True,
                                    directions=self.objective.study_directions)
        wanted = [optuna.study.StudyDirection[d.upper()] for d in self.objective.study_directions]
        if list(study.directions) != wanted:
            raise SweepConfigError(
                f"study {self.study_name!r} in {_safe(url)} optimises {[d.name.lower() for d in study.directions]}, "
                f"not {self.objective.study_directions}: use another sweep.study_name for another objective")
        n_before = len(study.trials)
        if self.sampler_cfg:
            cfg = dict(self.sampler_cfg)
            if cfg.get("seed") is not None:
                # A seeded sampler restarted on a resumed study would propose the first run's parameters again;
                # offsetting by the trials already there keeps a resume reproducible and new.
                cfg["seed"] = int(cfg["seed"]) + n_before
            study.sampler = instantiate(cfg)
        return study, storage, url

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None
        try:
            space, fixed = space_mod.parse(self.params, arguments)
        except ValueError as e:
            raise SweepConfigError(str(e)) from None
        if not space:
            raise SweepConfigError("the search space is empty: set hydra.sweeper.params (see conf/hparams_search/)")
        self._preflight(space, fixed)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        from dreambench.resilience.hydra_redact import redacted_multirun_yaml
        from dreambench.utils.io import atomic_write_text
        atomic_write_text(sweep_dir / "multirun.yaml", redacted_multirun_yaml(self.config))
        study, storage, url = self.open(sweep_dir)
        self._write_card(sweep_dir, url, space)
        recover_stale(study, storage, self.stale_after_s)
        for params in self.enqueue:
            study.enqueue_trial(dict(params), skip_if_exists=True)
        # The journal path reaches the trials explicitly; a URL is already in their config (sweep.storage), so
        # a password in it is not copied into every trial's overrides.
        job_fixed = fixed + ([f"sweep.storage='{url}'"] if "://" not in url else [])
        log.info("study %r in %s: %d/%d trials, %d at a time, searching %s", self.study_name, _safe(url),
                 sum(counted(t) for t in study.trials), self.n_trials, self.n_jobs, ", ".join(space))

        returns: list[Sequence[JobReturn]] = []
        while True:
            trials = study.get_trials(deepcopy=False)
            n_failed = sum(failed(t) for t in trials)
            if n_failed > self.max_failure_rate * self.n_trials:
                raise SweepStopped(
                    f"sweep stopped: {n_failed} of the study's trials failed, more than max_failure_rate="
                    f"{self.max_failure_rate:g} x n_trials={self.n_trials}; reasons are in each trial's "
                    f"'{FAIL_REASON}' (python -m analysis.compare {sweep_dir})")
            remaining = self.n_trials - sum(counted(t) for t in trials)
            if remaining <= 0:
                break
            batch = self._ask(study, storage, space, min(self.n_jobs, remaining))
            if not batch:
                break
            returns.append(self._run(study, storage, batch, job_fixed))
        self._summary(study, sweep_dir)
        return returns

    def _preflight(self, space: dict, fixed: list[str]) -> None:
        """Compose the trials' config at the first enqueued points and at the search space's two corners, and run
        the task's check on each (`hydra.sweeper.preflight`, dreambench.train.preflight for training): a mistake
        every trial would make stops the sweep here, before the study is opened or any trial is asked."""
        if not self.preflight:
            return
        from hydra.utils import get_method

        from dreambench.errors import UserError
        check = get_method(self.preflight)
        corners = [{k: _corner(d, hi) for k, d in space.items()} for hi in (False, True)]
        points = [dict(p) for p in self.enqueue[:2]] + corners
        loader = self.hydra_context.config_loader
        for point in points:
            overrides = fixed + [f"{k}={v!r}" for k, v in point.items()]
            try:
                job_cfg = loader.load_sweep_config(self.config, overrides)
                with open_dict(job_cfg):  # as Hydra hands it to a job: without the hydra node
                    del job_cfg["hydra"]
                check(job_cfg)
            except UserError as e:
                where = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())
                raise SweepConfigError(f"{e} (checked before any trial, at {where}; the study is untouched)") from None
            except HydraException as e:
                raise SweepConfigError(f"{str(e).splitlines()[0]} (checked before any trial; the study is "
                                       f"untouched)") from None

    def _ask(self, study: optuna.Study, storage: Any, space: dict, n: int) -> list[Trial]:
        batch = []
        owner = this_process()
        for _ in range(n):
            trial = study.ask(fixed_distributions=space)
            storage.set_trial_system_attr(trial._trial_id, OWNER, owner)  # noqa: SLF001 - the public id is this
            earlier = sum(counted(t) for t in study.get_trials(deepcopy=False) if t.number < trial.number)
            if earlier >= self.n_trials:  # other workers filled the study between our count and this ask
                fail_trial(storage, trial_id(storage, self.study_name, trial.number),
                           "surplus: the study reached n_trials while this trial was asked; not run",
                           **{SURPLUS: True})
                break
            batch.append(trial)
        return batch

    def _run(self, study: optuna.Study, storage: Any, batch: list[Trial], fixed: list[str]) -> Sequence[JobReturn]:
        overrides = [fixed + [f"{k}={v!r}" for k, v in t.params.items()] + [f"sweep.trial={t.number}"]
                     for t in batch]
        for t, o in zip(batch, overrides):
            log.info("trial %d: %s", t.number, " ".join(o[len(fixed):]))
        ids = [trial_id(storage, self.study_name, t.number) for t in batch]
        try:
            with Heartbeat(storage, ids, self.heartbeat_s):
                results = self.launcher.launch(overrides, initial_job_idx=batch[0].number)
        except BaseException as e:
            # Interrupted (Ctrl-C) or the launcher lost its jobs: nothing of this batch can be told. Fail the
            # trials as stale and enqueue them again, so the next run retries them without waiting.
            why = "interrupted" if isinstance(e, KeyboardInterrupt) else f"launcher error: {type(e).__name__}: {e}"
            for t, tid in zip(batch, ids):
                if fail_trial(storage, tid, f"stale: {why}; retried with the same parameters", **{STALE: True}):
                    study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            raise
        config_errors = [e for t, ret in zip(batch, results) if (e := self._tell(study, storage, t, ret))]
        if config_errors:
            raise SweepConfigError(config_errors[0])
        return results

    def _tell(self, study: optuna.Study, storage: Any, trial: Trial, ret: JobReturn) -> str | None:
        """Record one finished job in the study; the stopping line when it failed on a configuration error."""
        from dreambench.errors import UserError
        run_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg else None
        metrics = _read_metrics(run_dir)
        try:
            if run_dir:
                trial.set_user_attr("run_dir", str(run_dir))
            if "wall_time_s" in metrics:
                trial.set_user_attr("wall_time_s", metrics["wall_time_s"])
            try:
                # re-raises the trial's exception; Hydra first writes "Error executing job with overrides: [...]"
                # straight to stderr, secrets among them: the failure is logged below with its reason instead.
                with contextlib.redirect_stderr(io.StringIO()):
                    raw = ret.return_value
            except optuna.TrialPruned as e:
                trial.set_user_attr(FAIL_REASON, f"pruned: {e}")
                study.tell(trial, state=TrialState.PRUNED)
                log.info("trial %d pruned: %s", trial.number, e)
                return None
            except UserError as e:  # the config, not the hyper-parameters: not counted, and the sweep stops
                fail_trial(storage, trial._trial_id, f"config error: {e}", **{CONFIG_ERROR: True})  # noqa: SLF001
                return (f"{e} (trial {trial.number}; a configuration error: recorded, not counted as a failed "
                        f"trial; fix it and run the same command again)")
            except Exception as e:  # noqa: BLE001 - any failure of one trial is that trial's result
                return self._fail(study, trial, f"{type(e).__name__}: {e}")
            try:
                values = self.objective.values(raw)
            except ObjectiveError as e:
                return self._fail(study, trial, str(e))
            trial.set_user_attr("metrics", dict(zip(self.objective.metrics, _floats(raw))))
            study.tell(trial, values)
            log.info("trial %d: %s", trial.number, ", ".join(f"{k}={v:.4g}" for k, v in
                                                                zip(self.objective.metrics, _floats(raw))))
        except optuna.exceptions.UpdateFinishedTrialError:
            log.warning("trial %d was finished elsewhere (stale-failed by another worker?)", trial.number)
        return None

    def _fail(self, study: optuna.Study, trial: Trial, reason: str) -> None:
        trial.set_user_attr(FAIL_REASON, reason[:2000])
        study.tell(trial, state=TrialState.FAIL)
        log.warning("trial %d failed: %s", trial.number, reason.splitlines()[0] if reason else "")

    # ---- evidence -----------------------------------------------------------------------------------
    def _write_card(self, sweep_dir: Path, url: str, space: dict) -> None:
        from dreambench.utils.io import atomic_write_json
        atomic_write_json(sweep_dir / "sweep.json", {
            "study_name": self.study_name, "storage": _safe(url), "n_trials": self.n_trials,
            "metrics": list(self.objective.metrics), "directions": list(self.objective.directions),
            "weights": list(self.objective.weights) if self.objective.weights else None,
            "space": {k: repr(v) for k, v in space.items()},
        })

    def _summary(self, study: optuna.Study, sweep_dir: Path) -> None:
        states = {s.name: 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
        for t in study.get_trials(deepcopy=False):
            if counted(t) and t.state.name in states:
                states[t.state.name] += 1
        log.info("study %r: %s", self.study_name, ", ".join(f"{v} {k.lower()}" for k, v in states.items()))
        if states["RUNNING"]:
            log.info("%d trial(s) still running in other sweepers (the study's target counts them; a sweeper that "
                     "died on this host is noticed at once, on another host after hydra.sweeper.stale_after_s)",
                     states["RUNNING"])
        try:
            best = study.best_trials
        except ValueError:
            best = []
        for t in best[:10]:
            log.info("best trial %d: %s -> %s", t.number, t.params, t.values)
        log.info("compare: python -m analysis.compare %s", sweep_dir)


def _corner(d: Any, high: bool) -> Any:
    """The low or high end of an Optuna distribution (a categorical's first or last choice)."""
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return d.choices[-1 if high else 0]
    return d.high if high else d.low


def _plain(x: Any) -> Any:
    return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x


def _floats(raw: Any) -> list[float]:
    return [float(raw)] if isinstance(raw, (int, float)) else [float(v) for v in raw]


def _safe(url: str) -> str:
    """A storage URL without its password, for logs and sweep.json."""
    if "://" not in url:
        return url
    from sqlalchemy.engine import make_url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - never let logging a URL fail a sweep
        return url.split("://", 1)[0] + "://***"


def _read_metrics(run_dir: str | None) -> dict[str, Any]:
    if not run_dir:
        return {}
    try:
        return json.loads((Path(run_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
