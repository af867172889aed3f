"""Sweeps recover by themselves (issue 14, item 4), on the toy objective of tests/sweep_helpers.py: a sweep killed
mid-trial is retried at once by the next run on the same host; a configuration error stops the sweep with one
line and exit 2, before any trial when the preflight can see it, and never counts against the study; and one
command resets a study without losing what it found."""

from __future__ import annotations

import signal
import socket
import time

from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from sweep_helpers import journal_study, popen_toy, run, run_toy, toy_config

from dreambench.sweep.study import CONFIG_ERROR, OWNER, STALE, counted, this_process


def _wait_for_running(journal, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if journal.exists():
            try:
                study = journal_study(journal, "toy")
            except KeyError:
                study = None
            if study is not None:
                running = [t for t in study.trials if t.state == TrialState.RUNNING and OWNER in t.system_attrs]
                if running:
                    return running
        time.sleep(0.2)
    raise AssertionError("no trial started running")


def test_a_killed_sweep_is_retried_at_once_on_this_host(tmp_path):
    # A trial that sleeps long enough to be killed in; stale_after_s is the default (300 s): only the dead-owner
    # check can retry it without waiting.
    conf = toy_config(tmp_path, n_trials=2, sleep_s=120.0)
    journal = tmp_path / "sweep" / "study.journal"
    worker = popen_toy(conf)
    try:
        [killed] = _wait_for_running(journal)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert killed.system_attrs[OWNER]["pid"] == worker.pid and killed.system_attrs[OWNER]["host"] == socket.gethostname()

    # Another trial owned by a live process on this host (this test): left alone, and it counts.
    study = journal_study(journal, "toy")
    live = study.ask({"x": FloatDistribution(0.0, 1.0)})
    study._storage.set_trial_system_attr(live._trial_id, OWNER, this_process())  # noqa: SLF001

    r = run_toy(conf, "sleep_s=0", "hydra.sweeper.n_trials=4")
    assert r.returncode == 0, r.stderr[-3000:]
    study = journal_study(journal, "toy")
    t = study.trials[killed.number]
    assert t.state == TrialState.FAIL and t.system_attrs[STALE]
    assert t.user_attrs["fail_reason"].startswith(f"stale: its sweeper (pid {worker.pid} on ")
    retry = [x for x in study.trials if x.user_attrs.get("retry_of") == killed.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == t.params
    assert study.trials[live.number].state == TrialState.RUNNING
    assert sum(counted(x) for x in study.trials) == 4


def test_a_config_error_stops_the_sweep_before_any_trial(tmp_path):
    # The search space reaches x=2, which the task's preflight refuses: one line, exit 2, no trial, no study.
    conf = toy_config(tmp_path, n_trials=3, sleep_s=0.0, **{"hydra.sweeper.params": {"x": "interval(0.0, 2.0)"}})
    r = run_toy(conf)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["dreambench: error: x=2.0 must be within [0, 1] (checked before any trial, at x=2; the study "
                     "is untouched)"], r.stderr
    assert not (tmp_path / "sweep" / "study.journal").exists()
    assert not list((tmp_path / "sweep").glob("trial_*"))
    # Fixed on the command line: the sweep runs.
    r = run_toy(conf, "x=interval(0.0,1.0)")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sum(t.state == TrialState.COMPLETE for t in journal_study(tmp_path / "sweep" / "study.journal",
                                                                      "toy").trials) == 3


def test_a_trial_config_error_stops_the_sweep_and_does_not_poison_the_study(tmp_path):
    # Every trial hits a configuration error the preflight cannot see; no failure is allowed at all.
    conf = toy_config(tmp_path, n_trials=3, sleep_s=0.0, config_error_above=-1.0,
                      **{"hydra.sweeper.max_failure_rate": 0.0})
    for _ in range(2):  # the same mistake twice: still one line, and still no failure counted
        r = run_toy(conf)
        assert r.returncode == 2, r.stderr[-3000:]
        [line] = [ln for ln in r.stderr.splitlines() if ln.startswith("dreambench: error:")]
        assert "toy config error: x=" in line and "> -1.0 (trial " in line and "not counted as a failed trial" in line
    study = journal_study(tmp_path / "sweep" / "study.journal", "toy")
    assert len(study.trials) == 2  # one trial per run: the sweep stopped at the first
    assert all(t.state == TrialState.FAIL and t.system_attrs[CONFIG_ERROR] for t in study.trials)
    assert not any(counted(t) for t in study.trials)
    # Fixed: the same study reaches its target, with max_failure_rate=0 not tripped by the config errors.
    r = run_toy(conf, "config_error_above=null")
    assert r.returncode == 0, r.stderr[-3000:]
    study = journal_study(tmp_path / "sweep" / "study.journal", "toy")
    assert sum(counted(t) for t in study.trials) == 3
    assert all(t.state == TrialState.COMPLETE for t in study.trials if counted(t))


def test_reset_archives_the_study_and_the_next_run_starts_afresh(tmp_path):
    conf = toy_config(tmp_path, n_trials=2, sleep_s=0.0)
    assert run_toy(conf).returncode == 0
    sweep = tmp_path / "sweep"
    before = [(t.number, t.params, t.values) for t in journal_study(sweep / "study.journal", "toy").trials]
    assert len(before) == 2 and (sweep / "trial_0" / "metrics.json").is_file()

    r = run(["reset", str(sweep)], module="dreambench.sweep")
    assert r.returncode == 0, r.stderr
    [archive] = sweep.glob("reset-*")
    assert "study 'toy' reset: its 2 trials" in r.stdout
    kept = journal_study(archive / "study.journal", "toy")  # what the study found is kept, whole
    assert [(t.number, t.params, t.values) for t in kept.trials] == before
    assert (archive / "trial_0" / "metrics.json").is_file() and not (sweep / "trial_0").exists()
    try:
        journal_study(sweep / "study.journal", "toy")
        raise AssertionError("the study is still in the storage")
    except KeyError:
        pass

    assert run_toy(conf, "seed=7").returncode == 0  # the same command starts again at trial 0
    assert [t.number for t in journal_study(sweep / "study.journal", "toy").trials] == [0, 1]

    # Nothing to reset, and a folder that is not there: one line each, exit 2.
    r = run(["reset", str(tmp_path / "nope")], module="dreambench.sweep")
    assert r.returncode == 2 and r.stderr.strip() == f"dreambench: error: sweep folder not found: {tmp_path / 'nope'}"


def test_reset_refuses_while_a_trial_is_running(tmp_path):
    conf = toy_config(tmp_path, n_trials=1, sleep_s=0.0)
    assert run_toy(conf).returncode == 0
    study = journal_study(tmp_path / "sweep" / "study.journal", "toy")
    live = study.ask({"x": FloatDistribution(0.0, 1.0)})
    study._storage.set_trial_system_attr(live._trial_id, OWNER, this_process())  # noqa: SLF001
    r = run(["reset", str(tmp_path / "sweep")], module="dreambench.sweep")
    assert r.returncode == 2 and f"trial(s) {live.number} of study 'toy' may still be running" in r.stderr
    assert len(journal_study(tmp_path / "sweep" / "study.journal", "toy").trials) == 2
    assert not list((tmp_path / "sweep").glob("reset-*"))


def test_the_training_sweep_checks_its_config_before_any_trial(tmp_path):
    # dreambench.train's own preflight (schema ranges), through the real lr_prior search space.
    r = run(["-m", "+experiment=dog", "+hparams_search=lr_prior", "model=tiny", "data.resolution=30",
             f"paths.output_dir={tmp_path}"])
    assert r.returncode == 2, r.stderr[-3000:]
    [line] = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert line.startswith("dreambench: error: invalid config: data.resolution=30 must be ") and \
        "checked before any trial" in line, r.stderr
    assert not list(tmp_path.rglob("trial_*")) and not list(tmp_path.rglob("study.journal"))


def test_a_tiny_sweep_without_tiny_metrics_stops_before_any_trial_saying_what_to_add(tmp_path):
    # lr_prior scores trials with the drift monitor's DINO/CLIP; the default ones are real models, not here.
    r = run(["-m", "+experiment=dog", "+hparams_search=lr_prior", "model=tiny", "+preset=smoke",
             f"paths.output_dir={tmp_path}"])
    assert r.returncode == 2, r.stderr[-3000:]
    [line] = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert line.startswith("dreambench: error: metrics.dino.name_or_path=facebook/dino-vits16: not in the local cache")
    assert "(with model=tiny use metrics=tiny: tiny encoders built on first use)" in line
    assert "checked before any trial" in line
    assert not list(tmp_path.rglob("study.journal"))
