"""The study bookkeeping with the real sweeper plugin, Hydra launcher and Optuna storages, on a toy objective
(tests/sweep_helpers.py): parallel workers on one journal file and on a real PostgreSQL server, the failure budget,
pruned and stale trials; plus the search-space and objective translation."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from sweep_helpers import createdb, journal_study, popen_toy, postgres_server, run_toy, toy_config

from dreambench.sweep.objective import Objective, ObjectiveError, pick
from dreambench.sweep.space import parse
from dreambench.sweep.study import HEARTBEAT, STALE, SURPLUS, counted


def test_space_from_hydra_grammar():
    space, fixed = parse({"optimizer.lr": "tag(log, interval(1e-6, 1e-4))", "prior.weight": "interval(0, 2.0)",
                          "trainer.max_steps": "range(200, 1001, 200)", "g": "choice(a, b)"},
                         ["+experiment=dog", "prior.weight=0.5", "k=int(interval(1, 9))"])
    assert space["optimizer.lr"] == FloatDistribution(1e-6, 1e-4, log=True)
    assert space["trainer.max_steps"] == IntDistribution(200, 1000, step=200)
    assert space["g"] == CategoricalDistribution(("a", "b"))
    assert space["k"] == IntDistribution(1, 9)
    assert "prior.weight" not in space  # a fixed value on the command line replaces the sweep
    assert fixed == ["+experiment=dog", "prior.weight=0.5"]


def test_objective_values_directions_and_weights():
    two = Objective.build(["val/dino", "val/clip_t"], ["maximize", "maximize"])
    assert two.study_directions == ["maximize", "maximize"] and not two.single
    assert two.values([0.5, 0.25]) == [0.5, 0.25]
    w = Objective.build(["val/dino", "train/loss"], ["maximize", "minimize"], [2.0, 0.5])
    assert w.single and w.study_directions == ["maximize"]
    assert w.values([0.5, 0.2]) == [pytest.approx(2.0 * 0.5 - 0.5 * 0.2)]
    with pytest.raises(ObjectiveError, match="not finite: val/dino=nan"):
        two.values([float("nan"), 0.1])
    with pytest.raises(ValueError, match="2 entries for 1 metrics"):
        Objective.build(["val/dino"], ["maximize", "minimize"])
    assert pick({"val/dino": 0.5, "train/loss": 1.0}, ["val/dino"]) == [0.5]
    with pytest.raises(ObjectiveError, match="val/clip_t not in this run's metrics .*train/loss"):
        pick({"val/dino": 0.5, "train/loss": 1.0}, ["val/dino", "val/clip_t"])


def _assert_exact_study(sweep: Path, study, n: int) -> None:
    trials = study.get_trials()
    done = [t for t in trials if counted(t)]
    assert len(done) == n and all(t.state == TrialState.COMPLETE for t in done), \
        [(t.number, t.state, t.user_attrs) for t in trials]
    runs = Counter(int(line.split()[0]) for line in (sweep / "executions.txt").read_text().split("\n") if line)
    assert sorted(runs) == sorted(t.number for t in done), "a trial was lost or an extra one was run"
    assert set(runs.values()) == {1}, f"a trial ran twice: {runs}"
    for t in done:  # what the storage holds is what the trial's run folder holds
        import json
        assert json.loads((sweep / f"trial_{t.number}" / "metrics.json").read_text())["y"] == t.value


def _workers(conf: Path, n: int, barrier: Path) -> list[str]:
    """n sweep workers on one study, reaching its storage at the same instant; all must finish cleanly."""
    procs = [popen_toy(conf, f"seed={s}", barrier=(barrier, n)) for s in range(1, n + 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    return outs


# Workers started together on an empty storage all create its schema and study at once: on PostgreSQL that
# raced to `DuplicateObject: type "studydirection" already exists` in one of them. Four workers, a fresh
# storage each time, a few times over.
RACES = 3


def test_workers_started_together_share_a_fresh_journal_file(tmp_path):
    for i in range(RACES):
        conf = toy_config(tmp_path / f"race{i}", n_trials=6, sleep_s=0.2)
        _workers(conf, 4, tmp_path / f"barrier{i}")
        sweep = tmp_path / f"race{i}" / "sweep"
        study = journal_study(sweep / "study.journal", "toy")
        _assert_exact_study(sweep, study, 6)
        surplus = [t for t in study.trials if t.system_attrs.get(SURPLUS)]
        assert all(t.state == TrialState.FAIL for t in surplus)


@pytest.mark.postgres
def test_workers_started_together_share_a_fresh_postgresql_database(tmp_path):
    with postgres_server() as server:
        for i in range(RACES):
            url = createdb(server, f"race{i}")  # empty: no Optuna tables, no types yet
            conf = toy_config(tmp_path / f"race{i}", n_trials=6, storage=url, sleep_s=0.2)
            _workers(conf, 4, tmp_path / f"barrier{i}")
            sweep = tmp_path / f"race{i}" / "sweep"
            study = optuna.load_study(study_name="toy", storage=url)
            _assert_exact_study(sweep, study, 6)
            assert not (sweep / "study.journal").exists()  # the URL was used, not the default file
        # A re-run with the same target adds nothing.
        r = run_toy(conf)
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(optuna.load_study(study_name="toy", storage=url).trials) == len(study.trials)


def test_failure_budget_pruned_and_reasons(tmp_path):
    # x > 0.6 fails, 0.45 < x <= 0.6 is pruned; the sweep goes on while failures <= 0.5 * 6.
    conf = toy_config(tmp_path, n_trials=6, sleep_s=0.0, fail_above=0.6, prune_above=0.45,
                      **{"hydra.sweeper.max_failure_rate": 0.5,
                         "hydra.sweeper.enqueue": [{"x": 0.9}, {"x": 0.5}, {"x": 0.1}]})
    r = run_toy(conf)
    study = journal_study(tmp_path / "sweep" / "study.journal", "toy")
    by = {t.number: t for t in study.trials}
    assert by[0].state == TrialState.FAIL and by[0].user_attrs["fail_reason"] == "ValueError: toy failure: x=0.9 > 0.6"
    assert by[1].state == TrialState.PRUNED and "toy prune" in by[1].user_attrs["fail_reason"]
    assert by[2].state == TrialState.COMPLETE
    n_fail = sum(t.state == TrialState.FAIL for t in study.trials)
    if r.returncode == 0:
        assert len([t for t in study.trials if counted(t)]) == 6 and n_fail <= 3
    else:  # the random x's failed more than the budget: stopped at the 4th failure with one line saying so
        assert n_fail == 4 and "sweep stopped: 4 of the study's trials failed" in r.stderr

    # No failure allowed: the first failure ends the sweep.
    conf0 = toy_config(tmp_path / "strict", n_trials=4, sleep_s=0.0, fail_above=0.6,
                       **{"hydra.sweeper.max_failure_rate": 0.0, "hydra.sweeper.enqueue": [{"x": 0.9}]})
    r0 = run_toy(conf0)
    assert r0.returncode != 0 and "max_failure_rate=0 x n_trials=4" in r0.stderr
    assert len(journal_study(tmp_path / "strict" / "sweep" / "study.journal", "toy").trials) == 1


def test_stale_trial_is_failed_and_retried(tmp_path):
    conf = toy_config(tmp_path, n_trials=2, sleep_s=0.0, **{"hydra.sweeper.stale_after_s": 5})
    assert run_toy(conf).returncode == 0
    study = journal_study(tmp_path / "sweep" / "study.journal", "toy")
    # A sweep killed mid-trial: RUNNING, last stamped long ago, and one still stamped by a live worker.
    dead = study.ask({"x": FloatDistribution(0.0, 1.0)})
    live = study.ask({"x": FloatDistribution(0.0, 1.0)})
    storage = study._storage  # noqa: SLF001 - the test plays the part of a sweeper process
    storage.set_trial_system_attr(dead._trial_id, HEARTBEAT, time.time() - 60)  # noqa: SLF001
    storage.set_trial_system_attr(live._trial_id, HEARTBEAT, time.time() + 600)  # noqa: SLF001
    r = run_toy(conf, "hydra.sweeper.n_trials=5")
    assert r.returncode == 0, r.stderr[-3000:]
    study = journal_study(tmp_path / "sweep" / "study.journal", "toy")
    t_dead, t_live = study.trials[dead.number], study.trials[live.number]
    assert t_dead.state == TrialState.FAIL and t_dead.system_attrs[STALE]
    assert t_dead.user_attrs["fail_reason"].startswith("stale: its sweeper stopped")
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == dead.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == t_dead.params
    assert t_live.state == TrialState.RUNNING  # another worker's trial is left alone, and counts
    assert sum(counted(t) for t in study.trials) == 5
