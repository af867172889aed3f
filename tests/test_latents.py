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


def test_class_latents_are_kept_by_content_and_load_back_bit_for_bit(tiny_model_dir, dataset_root, tmp_path):
    import shutil

    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae", use_safetensors=True)
    folder = tmp_path / "class"
    folder.mkdir()
    for p in sorted((dataset_root / "dog").glob("*.jpg"))[:3]:
        shutil.copy(p, folder / p.name)
    paths = sorted(folder.iterdir())
    cache, ctx = tmp_path / "latents", {"model": "tiny", "dtype": "torch.float32"}
    first, hit = LatentBank.cached(cache, ctx, vae, paths, 32, hflip=True)
    assert not hit and len(list(cache.iterdir())) == 1
    again, hit = LatentBank.cached(cache, ctx, vae, paths, 32, hflip=True)
    assert hit
    fresh = LatentBank.from_paths(vae, paths, 32, hflip=True)
    for a, b in ((again.mean, fresh.mean), (again.std, fresh.std), (again.geometry, fresh.geometry)):
        assert torch.equal(a, b) and a.stride() == b.stride()  # the layout too: the UNet's numbers depend on it
    assert torch.equal(first.mean, fresh.mean)
    # Anything that decides the numbers is in the key: the settings, the context, an image's bytes.
    assert not LatentBank.cached(cache, ctx, vae, paths, 32, hflip=False)[1]
    assert not LatentBank.cached(cache, {**ctx, "dtype": "torch.bfloat16"}, vae, paths, 32, hflip=True)[1]
    with Image.open(paths[0]) as im:
        im.rotate(90).save(paths[0])
    changed, hit = LatentBank.cached(cache, ctx, vae, paths, 32, hflip=True)
    assert not hit and not torch.equal(changed.mean, fresh.mean)
    # A torn file is encoded again and replaced, not trusted.
    for f in cache.iterdir():
        f.write_bytes(f.read_bytes()[:100])
    torn, hit = LatentBank.cached(cache, ctx, vae, paths, 32, hflip=True)
    assert not hit and torch.equal(torn.mean, changed.mean)
    assert LatentBank.cached(cache, ctx, vae, paths, 32, hflip=True)[1]


def test_an_unwritable_latent_cache_is_a_warning_and_the_run_keeps_its_latents(tiny_model_dir, dataset_root, tmp_path,
                                                                              caplog):
    import logging

    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae", use_safetensors=True)
    paths = sorted((dataset_root / "dog").glob("*.jpg"))[:2]
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="dreambench"):
        bank, hit = LatentBank.cached(not_a_folder / "latents", {"model": "tiny"}, vae, paths, 32)
    assert not hit and torch.equal(bank.mean, LatentBank.from_paths(vae, paths, 32).mean)
    assert "could not keep them" in caplog.text
    assert not_a_folder.read_text() == "a file where the cache folder should be"  # nothing of the user's touched
