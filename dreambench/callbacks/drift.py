"""Subject fidelity and language drift measured during training (val/dino, val/clip_i, val/clip_t, val/pres): the
signal a sweep optimises and prunes on. A cheap version of the DreamBench protocol (shared/docs/PROTOCOL.md):
a few prompts, a few fixed-seed images each, and the bare class prompt ("a dog") whose drift towards the subject
is what prior preservation (§3.3 of the paper) prevents.

Interface used on the LightningModule: `sampling_pipeline()` (a pipeline over the in-memory components, with the
guidance scheduler), `run_cfg` (the composed config), `identifier`, `subject` (`dreambench.data.dreambench.Subject`)
and `real_images` (the subject's real PIL images).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dreambench.data.dreambench import fill_prompt
from dreambench.metrics.functional import clip_t_text
from dreambench.metrics.scorer import MetricSet, Scorer, build_scorer
from dreambench.sampling import generate

CLASS_SEED_OFFSET = 1_000_000  # the same seed rule as dreambench.evaluate


class DriftMonitor(L.Callback):
    def __init__(self, every_n_steps: int = 100, num_prompts: int = 4, images_per_prompt: int = 2,
                 metrics: Mapping[str, Any] | DictConfig | None = None, class_images: int = 4, seed: int = 0,
                 num_inference_steps: int | None = None, batch_size: int = 4, at_end: bool = True,
                 prog_bar: bool = False, scorer: Scorer | None = None):
        if metrics is None and scorer is None:
            raise ValueError("DriftMonitor needs a metrics config (conf/metrics/*.yaml) or a Scorer")
        self.every_n_steps, self.num_prompts, self.images_per_prompt = int(every_n_steps), int(num_prompts), \
            int(images_per_prompt)
        self.class_images, self.seed, self.batch_size = int(class_images), int(seed), int(batch_size)
        self.num_inference_steps, self.at_end, self.prog_bar = num_inference_steps, at_end, prog_bar
        self.metrics_cfg = metrics
        self.scorer = scorer  # encoders: loaded once, on first use
        self.history: list[dict[str, float]] = []
        self._last_step = -1

    def _scorer(self) -> Scorer:
        if self.scorer is None:
            cfg = self.metrics_cfg if isinstance(self.metrics_cfg, DictConfig) else OmegaConf.create(self.metrics_cfg)
            self.scorer = build_scorer(cfg)
        return self.scorer

    def _prompts(self, pl_module) -> tuple[list[int], list[str], str]:
        subject = pl_module.subject
        class_noun = OmegaConf.select(pl_module.run_cfg, "data.class_noun") or subject.class_noun
        templates = subject.prompt_templates
        # Prompts spread evenly over the 25 (the lists run from backgrounds to accessories and styles).
        idx = sorted(set(np.linspace(0, len(templates) - 1, max(1, self.num_prompts)).round().astype(int).tolist()))
        return idx, [fill_prompt(templates[i], pl_module.identifier, class_noun) for i in idx], f"a {class_noun}"

    @torch.no_grad()
    def measure(self, pl_module) -> dict[str, float]:
        scorer = self._scorer()
        subject = pl_module.subject
        idx, prompts, class_prompt = self._prompts(pl_module)
        k = self.images_per_prompt
        all_prompts = [p for p in prompts for _ in range(k)] + [class_prompt] * self.class_images
        seeds = [self.seed + 1000 * i + j for i in idx for j in range(k)]
        seeds += [self.seed + CLASS_SEED_OFFSET + j for j in range(self.class_images)]
        guidance = dict(OmegaConf.to_container(pl_module.run_cfg.guidance, resolve=True))
        if self.num_inference_steps:
            guidance["num_inference_steps"] = int(self.num_inference_steps)

        unet = getattr(pl_module, "unet", None)
        was_training = unet.training if unet is not None else False
        if unet is not None:
            unet.eval()
        devices = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        try:
            # Sampling must not move the training RNG: with and without this callback, training is the same.
            # train.ema: the averaged weights are what is measured (and exported).
            with torch.random.fork_rng(devices=devices), getattr(pl_module, "ema_weights", contextlib.nullcontext)():
                images = generate(pl_module.sampling_pipeline(), all_prompts, seeds, guidance,
                                  batch_size=self.batch_size, progress=False)
        finally:
            if unet is not None and was_training:
                unet.train()

        gen, cls = images[: len(prompts) * k], images[len(prompts) * k:]
        real = scorer.real(subject.folder, images=pl_module.real_images)  # embedded once, then cached
        ms = MetricSet([subject.name])
        emb = scorer.embed(gen)
        texts = [clip_t_text(p, pl_module.identifier, scorer.clip_t_rule) for p in prompts for _ in range(k)]
        ms.dino.update(emb["dino"], real["dino"], subject.name)
        ms.clip_i.update(emb["clip"], real["clip"], subject.name)
        ms.clip_t.update(emb["clip"], scorer.embed_texts(texts), subject.name)
        out = {"val/dino": float(ms.dino.compute()["mean"]), "val/clip_i": float(ms.clip_i.compute()["mean"]),
               "val/clip_t": float(ms.clip_t.compute()["mean"])}
        if cls:
            ms.pres.update(scorer.dino.embed(cls), real["dino"], subject.name)
            out["val/pres"] = float(ms.pres.compute()["mean"])
        return out

    def _due(self, step: int) -> bool:
        return step != self._last_step and (step == 0 or (self.every_n_steps > 0 and step % self.every_n_steps == 0))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        # Before the optimizer step: the values logged at step s describe the weights after s updates.
        step = trainer.global_step
        if not self._due(step):
            return
        self._last_step = step
        if not trainer.is_global_zero:
            return
        values = self.measure(pl_module)
        self.history.append({"step": step, **values})
        # self.log feeds callback_metrics (checkpoint monitors, pruning callbacks, the sweep's return value); the
        # loggers are written directly because Lightning only forwards step logs every log_every_n_steps,
        # which would silently drop drift points whose step is not a multiple of it.
        for key, value in values.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, prog_bar=self.prog_bar, logger=False,
                          batch_size=1, rank_zero_only=True)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        # self.log is not allowed here: write to the loggers directly and expose the final values to callbacks.
        step = trainer.global_step
        if not self.at_end or step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = step
        values = self.measure(pl_module)
        self.history.append({"step": step, **values})
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
