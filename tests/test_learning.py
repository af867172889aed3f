"""The learning test: the tiny model, trained on a synthetic subject (a red disc on cyan), must generate what
it was shown — and the same run with a wrong latent scale or a wrong regression target must not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from helpers import compose

STEPS = 300
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("disc")
    for i, (cx, cy) in enumerate([(32, 32), (33, 32), (32, 33), (31, 32)]):
        im = Image.new("RGB", (64, 64), (40, 200, 220))
        ImageDraw.Draw(im).ellipse([cx - 16, cy - 16, cx + 16, cy + 16], fill=(230, 30, 30))
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
    """Generated latents against the subject's latents: direction (best cosine) and scale (norm ratio);
    and the decoded images against the decoded subject latents (pixel MSE)."""
    from diffusers import StableDiffusionPipeline

    from dreambench.data.latents import encode_latent_dist, preprocess
    from dreambench.sampling import generate, make_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, use_safetensors=True)
    pipe.scheduler = make_scheduler("DDIMScheduler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    guidance = dict(num_inference_steps=20, guidance_scale=1.0, height=32, width=32)
    z = torch.stack(generate(pipe, ["a sks toy"] * 4, [0, 1, 2, 3], guidance, progress=False, output_type="latent"))
    pixels = torch.stack([preprocess(Image.open(p).convert("RGB"), 32) for p in sorted(subject.iterdir())])
    ref, _ = encode_latent_dist(pipe.vae, pixels)  # the real scale, whatever training used
    zf, rf = z.flatten(1), ref.flatten(1)
    cos = (F.normalize(zf, dim=1) @ F.normalize(rf, dim=1).T).max(1).values.mean().item()
    scale = (zf.norm(dim=1) / rf.norm(dim=1).mean()).mean().item()
    with torch.no_grad():
        k = pipe.vae.config.scaling_factor
        img, ref_img = pipe.vae.decode(z / k).sample.clamp(-1, 1), pipe.vae.decode(ref / k).sample.clamp(-1, 1)
    pix = torch.cdist(img.flatten(1), ref_img.flatten(1)).pow(2).div(img[0].numel()).min(1).values.mean().item()
    return {"cos": cos, "scale": scale, "pixel_mse": pix}


def _learned(c: dict[str, float], untrained: dict[str, float]) -> bool:
    # Direction clearly towards the subject, the right magnitude, and decoded images closer than before.
    return c["cos"] > 0.2 and 0.5 < c["scale"] < 2.0 and c["pixel_mse"] < 0.9 * untrained["pixel_mse"]


@pytest.fixture(scope="module")
def untrained(subject, tiny_model_dir):
    return _closeness(tiny_model_dir, subject)


def test_untrained_model_does_not_pass_the_check(untrained):
    assert not _learned(untrained, untrained)


def test_trained_model_generates_the_subject(subject, untrained, tmp_path):
    c = _closeness(_train(subject, tmp_path / "run"), subject)
    assert _learned(c, untrained), (c, untrained)


def test_wrong_latent_scale_fails_the_check(subject, untrained, tmp_path, monkeypatch):
    import dreambench.data.latents as latents
    monkeypatch.setattr(latents, "latent_scale", lambda vae: 1.0)  # the bug: latents not scaled to unit variance
    c = _closeness(_train(subject, tmp_path / "run"), subject)
    assert not _learned(c, untrained), c


def test_wrong_target_fails_the_check(subject, untrained, tmp_path, monkeypatch):
    import dreambench.losses as losses
    # the bug: regress the clean latents while the scheduler samples as an epsilon model
    monkeypatch.setattr(losses, "diffusion_target", lambda pt, latents, noise, t, ac: latents)
    c = _closeness(_train(subject, tmp_path / "run"), subject)
    assert not _learned(c, untrained), c
