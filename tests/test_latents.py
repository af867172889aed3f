"""The latent scale, pinned directly (the learning test's scale controls see it only through a whole training run):
cached latents are the VAE's mean times the model's declared scaling factor (SD's 0.18215, which the tiny model
shares), and steps draw every image."""

from __future__ import annotations

import torch
from PIL import Image

from dreambench.data.latents import LatentBank, draw_indices, preprocess


def test_cached_latents_are_scaled_by_the_declared_factor(tiny_model_dir, dataset_root):
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae", use_safetensors=True)
    assert vae.config.scaling_factor == 0.18215  # != 1: a forgotten factor changes every latent 5.5x
    paths = sorted((dataset_root / "dog").glob("*.jpg"))[:2]
    bank = LatentBank.from_paths(vae, paths, resolution=32)
    pixels = torch.stack([preprocess(Image.open(p).convert("RGB"), 32) for p in paths])
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mean * 0.18215
    torch.testing.assert_close(bank.mean, expected, rtol=1e-5, atol=1e-5)
    # unit-variance latents, as the noise schedule expects, and a near-deterministic posterior
    assert 0.3 < bank.mean.std().item() < 3.0 and bank.std.max().item() < 0.01


def test_each_epoch_draws_every_image_once_in_a_seeded_order():
    first, second = draw_indices(5, 0, range(0, 5)), draw_indices(5, 0, range(5, 10))
    assert sorted(first) == sorted(second) == [0, 1, 2, 3, 4] and first != second
    assert draw_indices(5, 0, [7, 3]) == [second[2], first[3]]  # a pure function of the position
    assert draw_indices(5, 1, range(5)) != first
