"""Hydra's sweep grammar -> Optuna distributions, so a search space reads like any Hydra sweep:

    optimizer.lr: tag(log, interval(1e-6, 1e-4))   -> FloatDistribution(1e-6, 1e-4, log=True)
    prior.weight: interval(0.1, 2.0)               -> FloatDistribution(0.1, 2.0)
    trainer.max_steps: range(200, 1001, 200)       -> IntDistribution(200, 1000, step=200)
    trainer.max_steps: int(interval(200, 1000))    -> IntDistribution(200, 1000)
    guidance.guidance_scale: choice(5.0, 7.5)      -> CategoricalDistribution((5.0, 7.5))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution


def distribution(override: Override) -> BaseDistribution:
    value = override.value()
    key = override.get_key_element()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(tuple(override.sweep_iterator(transformer=Transformer.encode)))
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        # range() excludes stop; Optuna's bounds are inclusive: high is the last value range() yields.
        n = math.ceil((stop - start) / step)
        if n < 1:
            raise ValueError(f"{key}: {override.input_line!r} is empty")
        if all(isinstance(x, int) for x in (start, stop, step)):
            return IntDistribution(int(start), int(start + (n - 1) * step), step=int(step))
        return FloatDistribution(float(start), float(start + (n - 1) * step), step=float(step))
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise ValueError(f"{key}: not a search space ({override.input_line!r}); use interval(a, b), "
                     "tag(log, interval(a, b)), range(a, b, step) or choice(x, y, ...)")


def parse(params: Mapping[str, Any] | None, arguments: list[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """`hydra.sweeper.params` plus the command line's sweep overrides -> (search space, fixed overrides).

    Overrides that are not sweeps (`trainer.max_steps=400`) are passed to every trial unchanged; a sweep given
    on the command line replaces the same key of `params`."""
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    overrides = OverridesParser.create().parse_overrides(lines)
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for o in overrides:
        key = o.get_key_element()
        if o.is_sweep_override():
            space[key] = distribution(o)
            fixed.pop(key, None)
        else:
            fixed[key] = f"{key}={o.get_value_element_as_str()}"
            space.pop(key, None)
    return space, list(fixed.values())
