"""Optuna sweeps driven by Hydra multirun (docs/SWEEPS.md).

    sweeper.py   the study loop: ask a batch, launch it through the Hydra launcher, tell the results
    study.py     storage (journal file by default, PostgreSQL by URL), heartbeats, stale trials, counting
    space.py     Hydra sweep grammar (interval/tag(log,...)/choice/range) -> Optuna distributions
    objective.py metric keys + directions (+ weights) -> the study's objective value(s)
    trial.py     the job side: trial record, pruning callback
"""
