"""Fixed-seed sample grids at step 0, every N steps and at the end: the first thing a person looks at.

At the end of a run `before_after.png` puts the first grid of the run beside the last, one row per prompt: what
training changed, prompt by prompt (the subject in new contexts, and the bare class prompt, where drift shows).

The step-0 grid is the untrained model's, so it is kept by content (`cache_dir`, train.sample_cache_dir): a
digest of everything that decides its pixels (the base model's identity, the run's model / method / guidance /
prompt settings, the seeds, the precision, the device and the weights' dtypes, `DreamBoothModule.
sample_cache_context`). A second run with the same digest shows the kept images instead of sampling them again
before its first step."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

import lightning as L
import torch

from dreambench.sampling import generate, image_grid

log = logging.getLogger("dreambench")


class SampleGrid(L.Callback):
    def __init__(self, folder: str | Path, every_n_steps: int = 200, prompts: list[str] | None = None,
                 seeds: list[int] = (0, 1), batch_size: int = 4, cache_dir: str | Path | None = None):
        self.folder, self.every = Path(folder), int(every_n_steps)
        self.prompts, self.seeds, self.batch_size = prompts, list(seeds), batch_size
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self._last_step = -1
        self._first: tuple[int, list[str], list] | None = None  # (step, prompts, images) of the run's first grid
        self._last: list = []                                   # the images of the latest grid

    def _prompts(self, pl_module) -> list[str]:
        # The instance prompt, a few DreamBench contexts (recontextualisation) and the bare class prompt
        # (language drift shows there first).
        if self.prompts:
            return [p.format(identifier=pl_module.identifier, class_noun=pl_module.run_cfg.data.class_noun)
                    for p in self.prompts]
        return [pl_module.instance_prompt, f"{pl_module.instance_prompt} on the beach",
                f"{pl_module.instance_prompt} in the snow", pl_module.class_prompt]

    @torch.no_grad()
    def render(self, trainer: L.Trainer, pl_module) -> Path | None:
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero:
            return None
        self._last_step = step
        prompts = self._prompts(pl_module)
        pairs = [(p, s) for p in prompts for s in self.seeds]
        cached = self._cache_folder(pl_module, pairs) if step == 0 else None
        images = self._load(cached, len(pairs)) if cached is not None else None
        if images is None:
            images = self._sample(pl_module, pairs)
            if cached is not None:
                self._keep(cached, images)
        else:
            log.info("sample grid at step 0: the untrained model's images from %s (cache hit)", cached)
        grid = image_grid(images, cols=len(self.seeds) * 2, labels=[p for p, _ in pairs])
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step_{step:06d}.png"
        grid.save(path)
        self._last = images
        if self._first is None:
            self._first = (step, prompts, images)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # W&B
                logger.log_image("samples", [grid], step=step, caption=[f"step {step}"])
        return path

    def _sample(self, pl_module, pairs: list[tuple[str, int]]) -> list:
        unet_training = pl_module.unet.training
        pl_module.unet.eval()
        try:
            pipe = pl_module.sampling_pipeline()
            # train.ema: grids show the averaged weights, the ones the run exports.
            with pl_module._precision(), getattr(pl_module, "ema_weights", contextlib.nullcontext)():
                return generate(pipe, [p for p, _ in pairs], [s for _, s in pairs], pl_module.run_cfg.guidance,
                                batch_size=self.batch_size, progress=False)
        finally:
            pl_module.unet.train(unet_training)

    def _cache_folder(self, pl_module, pairs: list[tuple[str, int]]) -> Path | None:
        context = getattr(pl_module, "sample_cache_context", None)
        if self.cache_dir is None or context is None:
            return None
        key = {"context": context(), "pairs": pairs}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return self.cache_dir / digest

    @staticmethod
    def _load(folder: Path, n: int) -> list | None:
        from PIL import Image
        if not (folder / "done").is_file():  # written last: a folder without it is incomplete
            return None
        try:
            images = []
            for i in range(n):
                with Image.open(folder / f"{i:02d}.png") as im:
                    images.append(im.convert("RGB"))
            return images
        except OSError:
            return None

    @staticmethod
    def _keep(folder: Path, images: list) -> None:
        import os

        from dreambench.utils.io import safe_rmtree
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(images):
                im.save(tmp / f"{i:02d}.png")
            (tmp / "done").write_text("")
            if (folder / "done").is_file():  # another run kept the same images first
                safe_rmtree(tmp, folder.parent)
                return
            os.replace(tmp, folder)
        except OSError as e:  # a full or read-only cache: the run goes on without it
            log.warning("sample grid cache: could not keep the step-0 images in %s (%s)", folder, e)
            safe_rmtree(tmp, folder.parent)

    def on_train_start(self, trainer, pl_module):
        self.render(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every > 0 and trainer.global_step % self.every == 0 and trainer.global_step > 0:
            self.render(trainer, pl_module)

    def before_after(self, step: int, images: list) -> Path | None:
        """before_after.png: per prompt, its images at the run's first grid, then the same seeds at `step`."""
        if self._first is None or self._first[0] == step:
            return None
        first_step, prompts, first = self._first
        n = len(self.seeds)
        tiles, labels = [], []
        for i, prompt in enumerate(prompts):
            tiles += first[i * n:(i + 1) * n] + images[i * n:(i + 1) * n]
            labels += ([prompt] * n + [f"after {step} steps"] * n if first_step == 0
                       else [f"step {first_step}: {prompt}"] * n + [f"step {step}"] * n)
        path = self.folder / "before_after.png"
        image_grid(tiles, cols=2 * n, labels=labels).save(path)
        return path

    def on_train_end(self, trainer, pl_module):
        self.render(trainer, pl_module)
        if trainer.is_global_zero:
            self.before_after(trainer.global_step, self._last)
