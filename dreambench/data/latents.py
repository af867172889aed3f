"""Cached latents of the subject and class images, and the deterministic order in which steps draw them.

Latents are computed once from un-augmented images (plus their mirror images when `data.hflip`), as the
VAE's latent distribution (mean, std); each step samples from it, as encoding the image every step would.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreambench.data.images import load_image

log = logging.getLogger("dreambench")


def resize_crop(image: Image.Image, resolution: int, center_crop: bool = True,
                resample: int = Image.BICUBIC) -> Image.Image:
    """Short side to `resolution`, then a `resolution`² crop (centred, or the top-left corner)."""
    w, h = image.size
    s = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), resample)
    w, h = image.size
    left, top = ((w - resolution) // 2, (h - resolution) // 2) if center_crop else (0, 0)
    return image.crop((left, top, left + resolution, top + resolution))


def crop_geometry(size_wh: tuple[int, int], size_hw: tuple[int, int], center_crop: bool = True,
                  mirrored: bool = False) -> list[int]:
    """Where `resize_crop` / `fit_crop` take an image of `size_wh` = (W, H) to: [original height, original width,
    crop top, crop left (in the resized image), target height, target width] — SDXL's six micro-conditioning
    numbers, as diffusers' train_dreambooth_lora_sdxl.py records them per image (original_size, crop_top_left,
    target_size). `mirrored`: the crop's mirror image (data.hflip), whose left edge is counted from the other side
    of the resized image."""
    w, h = size_wh
    H, W = size_hw
    s = max(H / h, W / w)
    rw, rh = max(W, round(w * s)), max(H, round(h * s))
    left, top = ((rw - W) // 2, (rh - H) // 2) if center_crop else (0, 0)
    return [h, w, top, rw - W - left if mirrored else left, H, W]


def preprocess(image: Image.Image, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """Short side to `resolution` (bicubic, antialiased), centre crop; -> [3, H, W] float in [-1, 1]."""
    image = resize_crop(image, resolution, center_crop)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return x / 127.5 - 1.0


def fit_crop(image: Image.Image, size_hw: tuple[int, int], center_crop: bool = True,
             resample: int = Image.BICUBIC) -> Image.Image:
    """Resize to cover `size_hw` = (H, W) keeping the aspect ratio, then crop to it (centred, or top-left): the
    rectangle version of `preprocess`'s geometry, used for aspect-ratio buckets (data.buckets)."""
    H, W = size_hw
    w, h = image.size
    s = max(H / h, W / w)
    image = image.resize((max(W, round(w * s)), max(H, round(h * s))), resample)
    w, h = image.size
    left, top = ((w - W) // 2, (h - H) // 2) if center_crop else (0, 0)
    return image.crop((left, top, left + W, top + H))


def to_tensor(image: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return x / 127.5 - 1.0


def latent_scale(vae) -> float:
    # SD's 0.18215 (SD 1.x/2.x), 0.13025 (SDXL): latents are multiplied by it after encoding.
    return float(vae.config.scaling_factor)


@torch.no_grad()
def encode_latent_dist(vae, pixels: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels [N, 3, H, W] in [-1, 1] -> (mean, std) of the scaled latent distribution, each [N, C, H/f, W/f]."""
    p = next(vae.parameters())
    means, stds = [], []
    for i in range(0, len(pixels), batch_size):
        dist = vae.encode(pixels[i:i + batch_size].to(p.device, p.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    k = latent_scale(vae)
    shift = getattr(vae.config, "shift_factor", None)  # SD3's VAE: latents = (z - shift) x scale
    mean = torch.cat(means) - shift if shift else torch.cat(means)
    return mean * k, torch.cat(stds) * k


class LatentBank:
    """Latent distributions of a set of images; `sample(idx, g)` draws one latent per index. `mask` (optional,
    loss.mask): each image's loss weight per latent pixel, [N, 1, h, w]. `geometry` [N, 6] (float): each image's
    original size, crop corner and target size (`crop_geometry`), for families that condition on them (SDXL)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, mask: torch.Tensor | None = None,
                 geometry: torch.Tensor | None = None):
        self.mean, self.std, self.mask = mean, std, mask
        if geometry is None:  # unknown: the latent grid x 8 as both original and target size, no crop
            h, w = (int(x) * 8 for x in mean.shape[-2:])
            geometry = torch.tensor([[h, w, 0, 0, h, w]] * len(mean), dtype=torch.float32)
        self.geometry = geometry.to(mean.device)

    def __len__(self) -> int:
        return len(self.mean)

    @classmethod
    def from_paths(cls, vae, paths: Sequence[Path], resolution: int, center_crop: bool = True,
                   hflip: bool = False, batch_size: int = 8, masks: torch.Tensor | None = None,
                   size_hw: tuple[int, int] | None = None) -> "LatentBank":
        """`masks`: [N, 1, H, W] pixel masks of the images (dreambench.data.sidecars.photo_masks), brought to the
        latent grid here and mirrored with the images. `size_hw`: a rectangle (H, W) instead of the square
        `resolution` (an aspect-ratio bucket)."""
        images = [load_image(p) for p in paths]
        if size_hw is None:
            pixels = torch.stack([preprocess(im, resolution, center_crop) for im in images])
        else:
            pixels = torch.stack([to_tensor(fit_crop(im, size_hw, center_crop)) for im in images])
        hw = size_hw or (resolution, resolution)
        geometry = [crop_geometry(im.size, hw, center_crop) for im in images]
        if hflip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
            masks = torch.cat([masks, masks.flip(-1)]) if masks is not None else None
            geometry += [crop_geometry(im.size, hw, center_crop, mirrored=True) for im in images]
        geometry = torch.tensor(geometry, dtype=torch.float32)
        mean, std = encode_latent_dist(vae, pixels, batch_size)
        if masks is not None:
            from dreambench.data.sidecars import latent_mask
            masks = latent_mask(masks, tuple(mean.shape[-2:])).to(mean.device)
        return cls(mean, std, masks, geometry)

    @classmethod
    def cached(cls, cache_dir: str | Path | None, context: dict, vae, paths: Sequence[Path], resolution: int,
               center_crop: bool = True, hflip: bool = False, batch_size: int = 8) -> tuple["LatentBank", bool]:
        """`from_paths`, kept under `cache_dir` by content: the bytes of every image and `context` (what else
        decides the numbers: the model's identity, the VAE's dtype and device, the precision). A second run
        with the same class images loads their latents instead of encoding them again (200 class images at
        512²: seconds on a GPU, most of a CPU run's start). Returns (bank, whether it came from the cache);
        `cache_dir` None: no cache."""
        if cache_dir is None:
            return cls.from_paths(vae, paths, resolution, center_crop, hflip, batch_size), False
        from safetensors import safe_open
        from safetensors.torch import save

        from dreambench.utils.io import atomic_write_bytes
        key = bank_key(paths, {**context, "resolution": resolution, "center_crop": center_crop, "hflip": hflip,
                               "batch_size": batch_size, "scale": latent_scale(vae),
                               "shift": getattr(vae.config, "shift_factor", None)})
        f = Path(cache_dir).expanduser() / f"{key}.safetensors"
        device = next(vae.parameters()).device
        if f.is_file():
            try:
                with safe_open(str(f), "pt", device=str(device)) as sf:
                    layout = (sf.metadata() or {}).get("layout", "contiguous")
                    t = {k: sf.get_tensor(k) for k in ("mean", "std", "geometry")}
                mean, std = t["mean"], t["std"]
                if layout == "channels_last":
                    mean, std = (x.contiguous(memory_format=torch.channels_last) for x in (mean, std))
                return cls(mean, std, None, t["geometry"]), True
            except Exception as e:  # noqa: BLE001 - a torn or foreign file: encode again and replace it
                log.warning("class latents: %s unreadable (%s); encoding again", f, type(e).__name__)
        bank = cls.from_paths(vae, paths, resolution, center_crop, hflip, batch_size)
        # The VAE's output may come channels-last (oneDNN on a CPU): its layout is restored on loading, as the
        # UNet's convolutions on a channels-last input differ from a contiguous one's in the last bits.
        cl = bank.mean.is_contiguous(memory_format=torch.channels_last) and not bank.mean.is_contiguous()
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(f, save({"mean": bank.mean.contiguous().cpu(), "std": bank.std.contiguous().cpu(),
                                        "geometry": bank.geometry.contiguous().cpu()},
                                       metadata={"layout": "channels_last" if cl else "contiguous"}))
        except OSError as e:  # a full or read-only cache: the run goes on with the latents it encoded
            log.warning("class latents: could not keep them in %s (%s)", f.parent, e)
        return bank, False

    def to(self, device) -> "LatentBank":
        return LatentBank(self.mean.to(device), self.std.to(device),
                          self.mask.to(device) if self.mask is not None else None, self.geometry.to(device))

    def sample(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean, std = self.mean[idx], self.std[idx]
        return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


def bank_key(paths: Sequence[Path], context: dict) -> str:
    """A digest of the images' bytes, in order, and of `context` (JSON)."""
    import hashlib
    import json
    h = hashlib.sha256(json.dumps(context, sort_keys=True, default=str).encode())
    for p in paths:
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    return h.hexdigest()[:32]


def draw_indices(n: int, seed: int, positions: Sequence[int]) -> list[int]:
    """Image index for each global draw position: epoch e = pos // n visits every image once, in the order
    of a permutation seeded by (seed, e). A pure function of the position, so resuming at any step draws
    exactly what an uninterrupted run would, with no data-loader state to save."""
    out, perms = [], {}
    for pos in positions:
        e, j = divmod(int(pos), n)
        if e not in perms:
            perms[e] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + e)).tolist()
        out.append(perms[e][j])
    return out
