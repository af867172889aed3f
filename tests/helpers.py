"""Shared by the tests: real Hydra composition and tiny-run settings."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# A tiny CPU run: few steps, few class images, few sampling steps, no W&B.
TINY = ["model=tiny", "logger=csv", "progress=false", "trainer.max_steps=6", "prior.num_images=2",
        "prior.batch_size=2", "guidance.num_inference_steps=2", "train.sample_every_n_steps=0",
        "train.checkpoint_every_n_steps=0", "optimizer.lr=1e-3", "trainer.log_every_n_steps=1"]


def compose(overrides: list[str], config_name: str = "train"):
    """Compose a config exactly as the CLI does (real Hydra composition, not a hand-made dict)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def run_cli(module: str, args: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, **kw)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with `n` intra-op threads, restoring the count afterwards."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def equal(a, b) -> bool:
    """Bit for bit: tensors (dtype, shape, values), containers recursively, anything else by ==."""
    import torch
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def ddim_pipeline(model_dir):
    """The SD pipeline saved at `model_dir`, sampling with DDIM from the scheduler config the model ships (so a run
    that exported the wrong prediction type samples wrongly too), without progress bars."""
    from diffusers import StableDiffusionPipeline

    from dreambench.sampling import make_scheduler
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, use_safetensors=True)
    pipe.scheduler = make_scheduler("DDIMScheduler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def photo_distance(images, photos, resolution: int = 32) -> float:
    """Mean over `images` (PIL, at `resolution`) of the mean squared pixel distance, in [-1, 1], to the nearest of
    the `photos` (paths, brought to `resolution` as training does)."""
    import numpy as np
    import torch
    from PIL import Image

    from dreambench.data.latents import preprocess
    gen = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1) for im in images])
    shots = torch.stack([preprocess(Image.open(p).convert("RGB"), resolution) for p in photos])
    return (torch.cdist(gen.flatten(1), shots.flatten(1)) ** 2 / gen[0].numel()).min(1).values.mean().item()
