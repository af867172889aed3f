"""Hydra discovers sweepers only inside the `hydra_plugins` namespace package, and imports every module there
at start-up: this shell stays import-light and defers to dreambench.sweep.sweeper (Optuna, ask/tell) in setup().
Selected with `hydra/sweeper: optuna` (conf/hydra/sweeper/optuna.yaml), e.g. by `+hparams_search=lr_prior`."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper


class DreamBenchOptunaSweeper(Sweeper):
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.impl: Any = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from dreambench.sweep.sweeper import OptunaSweep
        self.impl = OptunaSweep(**self.kwargs)
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.impl.sweep(arguments)
