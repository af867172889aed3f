"""The training bar reads "training" and the logged metrics, not Lightning's "Epoch 0/-2 ... v_num" (issue 14)."""

from __future__ import annotations

import io

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from dreambench.callbacks.progress import RichStepsBar, TQDMStepsBar


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        loss = (self.w ** 2).sum()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=1)


def _fit(bar, tmp_path, **kw):
    trainer = L.Trainer(max_steps=6, max_epochs=-1, callbacks=[bar], logger=CSVLogger(tmp_path), accelerator="cpu",
                        enable_checkpointing=False, enable_model_summary=False, **kw)
    trainer.fit(_Tiny())
    return trainer


def test_the_rich_bar_says_training_and_shows_no_logger_version(tmp_path):
    out = io.StringIO()
    bar = RichStepsBar(console_kwargs={"file": out, "force_terminal": True, "width": 120})
    trainer = _fit(bar, tmp_path)
    text = out.getvalue()
    assert "Epoch" not in text and "/-2" not in text and "v_num" not in text, text[-500:]
    assert "training" in text and "training (epoch 2)" in text  # 6 steps over 4-batch epochs: a second epoch
    assert "train/loss" in text
    assert trainer.global_step == 6


def test_the_tqdm_bar_says_training(tmp_path, capsys):
    bar = TQDMStepsBar()
    _fit(bar, tmp_path)
    cap = capsys.readouterr()
    text = cap.out + cap.err
    assert "training" in text and "training (epoch 2)" in text, text[-500:]
    assert "Epoch" not in text and "v_num" not in text, text[-500:]
