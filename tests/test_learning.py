"""The learning test: the tiny model, trained on a synthetic subject (a rust disc on slate), must generate what
it was shown — and the same run with a wrong regression target must not.

Not here: a wrong *latent scale* negative control. At this size and CPU budget the scale of the generated
latents does not follow the scale of the training latents (correct: 1.24x the photos' latents; factor applied
twice: 0.86x; factor forgotten: 1.2-2.0x), and the decoder's GroupNorm normalises most of what remains, so the
decoded images of such runs pass this check by chance or not at all. The scale itself is pinned by
tests/test_latents.py (cached latents are the VAE mean times the declared scaling factor)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from helpers import compose, torch_threads

STEPS = 600
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("disc")
    # One image, four files: a point the model can learn in a few hundred CPU steps, so a wrong latent scale
    # shows as generated latents of the wrong size. One pixel differs per file (exact duplicates are refused).
    for i in range(4):
        # Mid-tone colours: an image decoded from latents of the wrong scale drifts away from them.
        im = Image.new("RGB", (64, 64), (100, 140, 150))
        ImageDraw.Draw(im).ellipse([16, 16, 48, 48], fill=(180, 100, 80))
        im.putpixel((0, 0), (100 + i, 140, 150))
        im.save(folder / f"{i}.png")
    return folder


def _train(subject: Path, run: Path) -> Path:
    from dreambench.train import train
    train(compose(["+experiment=dog", "model=tiny", "logger=none", "progress=false", "prior=none",
                   f"data.instance_dir={subject}", "data.subject=disc", "data.class_noun=toy",
                   f"trainer.max_steps={STEPS}", "optimizer.lr=1e-3", "train.samples=false",
                   "train.checkpoint_every_n_steps=0", f"paths.run_dir={run}"]))
    return run / "model"


def _closeness(model_dir: Path, subject: Path) -> dict[str, float]:
    """For 4 fixed-seed generations of "a sks toy": `pixel`, the mean squared distance of each image to the
    nearest subject photo (both at the training resolution, in [-1, 1]); `scale`, the norm of the generated
    latents over that of the photos' latents, encoded by the VAE with the model's declared scaling factor.
    Both references come from the photos and the VAE, not from any training code."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from dreambench.data.latents import preprocess
    from dreambench.sampling import generate, make_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, use_safetensors=True)
    pipe.scheduler = make_scheduler("DDIMScheduler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    guidance = dict(num_inference_steps=20, guidance_scale=1.0, height=32, width=32)
    prompts, seeds = ["a sks toy"] * 4, [0, 1, 2, 3]
    latents = torch.stack(generate(pipe, prompts, seeds, guidance, progress=False, output_type="latent"))
    images = generate(pipe, prompts, seeds, guidance, progress=False)
    gen = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1) for im in images])
    photos = torch.stack([preprocess(Image.open(p).convert("RGB"), 32) for p in sorted(subject.iterdir())])
    with torch.no_grad():
        ref = pipe.vae.encode(photos).latent_dist.mean * pipe.vae.config.scaling_factor
    return {
        "pixel": (torch.cdist(gen.flatten(1), photos.flatten(1)) ** 2 / gen[0].numel()).min(1).values.mean().item(),
        "scale": (latents.flatten(1).norm(dim=1).mean() / ref.flatten(1).norm(dim=1).mean()).item(),
    }


def _learned(c: dict[str, float], untrained: dict[str, float]) -> bool:
    # Measured on a 2-core EPYC, torch 2.13, 600 steps (pixel as a fraction of the untrained model's / scale):
    # trained 0.30 / 1.24; wrong target 1.34 / 20.2; untrained 1 / 18.4.
    return c["pixel"] < 0.65 * untrained["pixel"] and 0.5 < c["scale"] < 2.0


@pytest.fixture(autouse=True)
def _two_threads():
    # The margins above were measured with two intra-op threads; other tests may have changed the count.
    with torch_threads(2):
        yield


@pytest.fixture(scope="module")
def untrained(subject, tiny_model_dir):
    return _closeness(tiny_model_dir, subject)


def test_trained_model_generates_the_subject(subject, untrained, tmp_path):
    c = _closeness(_train(subject, tmp_path / "run"), subject)
    assert _learned(c, untrained), (c, untrained)


def test_wrong_target_fails_the_check(subject, untrained, tmp_path, monkeypatch):
    import dreambench.losses as losses
    # the bug: regress the clean latents while the scheduler samples as an epsilon model
    monkeypatch.setattr(losses, "diffusion_target", lambda pt, latents, noise, t, ac: latents)
    c = _closeness(_train(subject, tmp_path / "run"), subject)
    assert not _learned(c, untrained), (c, untrained)
