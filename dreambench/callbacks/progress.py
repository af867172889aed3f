"""The training progress bar: Lightning's, with a description a DreamBooth run can use.

DreamBooth trains for a number of steps (trainer.max_steps), with max_epochs=-1; Lightning's rich bar then reads
"Epoch 0/-2" (max_epochs - 1) and its metrics start with the logger's version ("v_num: lvq4"). This bar reads
"training" (with the epoch when a run spans several) and shows the losses as of the last logging step. Rich when it is
installed (Lightning's own default), tqdm otherwise.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE


def _description(trainer: Any) -> str:
    epoch = int(trainer.current_epoch)
    if trainer.max_epochs is None or trainer.max_epochs < 0:  # bounded by steps
        return "training" if epoch == 0 else f"training (epoch {epoch + 1})"
    return f"training (epoch {epoch + 1}/{trainer.max_epochs})"


class _Metrics:
    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        items.pop("v_num", None)
        # The losses as last read back on a logging step (DreamBoothModule._log_losses): showing them costs no
        # host sync, where a prog_bar metric is read back from the device every step.
        for k, v in (getattr(pl_module, "last_train_metrics", None) or {}).items():
            items[k.removeprefix("train/")] = f"{v:.4g}"
        return items


class RichStepsBar(_Metrics, RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        return _description(self.trainer)


class TQDMStepsBar(_Metrics, TQDMProgressBar):
    def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
        # Lightning's own, with our description: calling it and renaming after would print "Epoch 0" first.
        from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset()
        self.train_progress_bar.total = convert_inf(self.total_train_batches)
        self.train_progress_bar.initial = 0
        self.train_progress_bar.set_description(_description(trainer))


def progress_bar() -> RichProgressBar | TQDMProgressBar:
    return RichStepsBar() if _RICH_AVAILABLE else TQDMStepsBar()
