"""What a trial is scored on: metric keys from the run's metrics.json, one direction each.

Without weights each metric is its own objective (a Pareto front: subject fidelity vs prompt fidelity).
With weights they fold into one objective, maximise sum(w_i * s_i * m_i) with s_i = +1 to maximise and -1 to
minimise m_i; a single objective is what Optuna's pruners need (they do not prune multi-objective studies).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DIRECTIONS = ("maximize", "minimize")


class ObjectiveError(ValueError):
    """A trial's objective cannot be read from its metrics: the trial fails with this as its reason."""


def keys_of(optimized_metric: str | Sequence[str]) -> list[str]:
    return [optimized_metric] if isinstance(optimized_metric, str) else [str(k) for k in optimized_metric]


def pick(metrics: Mapping[str, Any], optimized_metric: str | Sequence[str]) -> float | list[float]:
    """The value(s) `python -m dreambench.train -m` returns to the sweeper: one float per key."""
    keys = keys_of(optimized_metric)
    missing = [k for k in keys if k not in metrics]
    if missing:
        have = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and "/" in k)
        raise ObjectiveError(f"optimized_metric {', '.join(missing)} not in this run's metrics (it has: "
                             f"{', '.join(have) or 'none'}); val/* metrics come from the drift callback")
    values = [float(metrics[k]) for k in keys]
    return values[0] if isinstance(optimized_metric, str) else values


@dataclass(frozen=True)
class Objective:
    metrics: tuple[str, ...]
    directions: tuple[str, ...]          # one per metric
    weights: tuple[float, ...] | None    # None: one objective per metric

    @classmethod
    def build(cls, metrics: str | Sequence[str], directions: str | Sequence[str],
              weights: Sequence[float] | None = None) -> Objective:
        keys = tuple(keys_of(metrics))
        dirs = (directions,) * len(keys) if isinstance(directions, str) else tuple(str(d) for d in directions)
        if not keys:
            raise ValueError("optimized_metric: no metric to optimise")
        if len(dirs) != len(keys):
            raise ValueError(f"sweep.directions has {len(dirs)} entries for {len(keys)} metrics {list(keys)}")
        bad = [d for d in dirs if d not in DIRECTIONS]
        if bad:
            raise ValueError(f"sweep.directions: {bad} (each is 'maximize' or 'minimize')")
        w = None
        if weights is not None:
            w = tuple(float(x) for x in weights)
            if len(w) != len(keys):
                raise ValueError(f"sweep.weights has {len(w)} entries for {len(keys)} metrics {list(keys)}")
        return cls(keys, dirs, w)

    @property
    def study_directions(self) -> list[str]:
        return ["maximize"] if self.weights is not None else list(self.directions)

    @property
    def single(self) -> bool:
        return len(self.study_directions) == 1

    def values(self, raw: float | Sequence[float]) -> list[float]:
        """The trial's returned metric value(s) -> the values told to the study; ObjectiveError if not finite."""
        raw = [raw] if isinstance(raw, (int, float)) else list(raw)
        if len(raw) != len(self.metrics):
            raise ObjectiveError(f"the trial returned {len(raw)} value(s) for {len(self.metrics)} metric(s)")
        vals = [float(v) for v in raw]
        bad = [f"{k}={v}" for k, v in zip(self.metrics, vals) if not math.isfinite(v)]
        if bad:
            raise ObjectiveError(f"objective not finite: {', '.join(bad)}")
        if self.weights is None:
            return vals
        return [sum(w * (1.0 if d == "maximize" else -1.0) * v
                    for w, d, v in zip(self.weights, self.directions, vals))]
