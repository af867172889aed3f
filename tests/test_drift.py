"""DriftMonitor inside a real lightning.Trainer on CPU, with a minimal LightningModule that provides the interface
the trainer's module provides (sampling_pipeline, run_cfg, identifier, subject, real_images)."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dreambench.callbacks.drift import DriftMonitor
from dreambench.data.dreambench import subject as db_subject
from test_evaluate import CONF, DATA, needs_data, synthetic, tiny_pipeline


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dreambench-cache")


class TinyDreamBoothModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        pipe = tiny_pipeline()
        self.unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        self.tokenizer, self.scheduler = pipe.tokenizer, pipe.scheduler
        self.run_cfg = OmegaConf.create({
            "data": {"subject": "dog", "class_noun": "dog", "live": True},
            "guidance": {"scheduler": "DDIMScheduler", "num_inference_steps": 2, "guidance_scale": 7.5,
                         "negative_prompt": "", "height": 32, "width": 32}})
        self.identifier = "sks"
        self.subject = db_subject(DATA, "dog")
        self.real_images = [synthetic(i) for i in range(3)]  # stand-ins: the callback must use these
        self.pipeline_calls = 0

    def sampling_pipeline(self):
        from dreambench.sampling import build_pipeline

        self.pipeline_calls += 1
        return build_pipeline(self.unet, self.vae, self.text_encoder, self.tokenizer, self.scheduler)

    def training_step(self, batch, batch_idx):
        # A real update of the UNet, so the step-1 images come from different weights than the step-0 ones.
        return self.unet.conv_out.weight.pow(2).sum() * 0 + (self.unet.conv_out.bias - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.unet.conv_out.parameters(), lr=0.5)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1)


@needs_data
def test_drift_monitor_logs_val_metrics_in_a_real_trainer(cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("DREAMBENCH_CACHE", str(cache_dir))
    with initialize_config_dir(str(CONF), version_base="1.3"):
        metrics_cfg = compose("evaluate", overrides=["metrics=tiny"]).metrics
    cb = DriftMonitor(every_n_steps=1, num_prompts=2, images_per_prompt=2, metrics=metrics_cfg, class_images=2)
    module = TinyDreamBoothModule()
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="drift")
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=logger, callbacks=[cb], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)

    # Steps 0 and 1 (before each update) and the end state (step 2).
    assert [h["step"] for h in cb.history] == [0, 1, 2]
    for h in cb.history:
        assert set(h) == {"step", "val/dino", "val/clip_i", "val/clip_t", "val/pres"}
        assert all(-1.0 <= v <= 1.0 for k, v in h.items() if k != "step")
    assert cb.history[0]["val/dino"] != cb.history[2]["val/dino"]  # the weights changed, so did the images
    assert module.pipeline_calls == 3
    for key in ("val/dino", "val/clip_i", "val/clip_t", "val/pres"):
        assert key in trainer.callback_metrics

    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/dino")]
    assert sorted(int(r["step"]) for r in rows) == [0, 1, 2]

    # Encoders loaded once; the real images embedded once, from pl_module.real_images.
    scorer = cb.scorer
    assert len(scorer._real) == 1
    real = next(iter(scorer._real.values()))
    torch.testing.assert_close(real["dino"], scorer.dino.embed(module.real_images))


def test_drift_monitor_needs_a_metrics_config():
    with pytest.raises(ValueError, match="metrics config"):
        DriftMonitor()
