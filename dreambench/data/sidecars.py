"""Files beside a photo that describe it: `<stem>.txt`, its caption (data.captions), and `<stem>.mask.png`, the
weight of each of its pixels in the loss (loss.mask). Neither is ever a training photo itself."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

log = logging.getLogger("dreambench")

MASK_SUFFIX = ".mask.png"
CAPTION_SUFFIX = ".txt"


def mask_path(photo: Path) -> Path:
    return photo.with_name(photo.stem + MASK_SUFFIX)


def caption_path(photo: Path) -> Path:
    return photo.with_name(photo.stem + CAPTION_SUFFIX)


def is_sidecar(path: Path, names: set[str]) -> bool:
    """A mask (`*.mask.png`, always) or a caption whose photo (same stem, another suffix) is in `names`."""
    if path.name.lower().endswith(MASK_SUFFIX):
        return True
    return path.suffix.lower() == CAPTION_SUFFIX and any(
        n != path.name and Path(n).stem == path.stem for n in names)


# ---- captions -------------------------------------------------------------------------------------------------------

def photo_prompts(photos: list[Path], default: str, identifier: str, class_noun: str) -> tuple[list[str], int]:
    """Each photo's prompt: its `<stem>.txt` caption with {identifier} / {class_noun} filled in (whitespace
    collapsed, as the instance prompt is), else `default` (data.instance_prompt, already filled). Returns the
    prompts and how many came from a caption file. A caption that cannot be filled, or is empty, is an error
    naming its file."""
    out, n = [], 0
    for p in photos:
        f = caption_path(p)
        if not f.is_file():
            out.append(default)
            continue
        text = f.read_text(encoding="utf-8")
        try:
            caption = " ".join(text.format(identifier=identifier, class_noun=class_noun).split())
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{f}: caption {text.strip()!r} cannot be filled ({type(e).__name__}: {e}); the "
                             f"placeholders are {{identifier}} and {{class_noun}}") from None
        if not caption:
            raise ValueError(f"{f}: empty caption (delete the file to use data.instance_prompt)")
        out.append(caption)
        n += 1
    missing = [p.name for p, c in zip(photos, out) if identifier not in c.split()]
    if missing:  # DreamBooth binds the subject to the identifier: a caption without it teaches the class instead
        log.warning("captions without the identifier %r: %s", identifier, missing)
    return out, n


# ---- masks ----------------------------------------------------------------------------------------------------------

def load_mask(photo: Path) -> tuple[Image.Image | None, str]:
    """The photo's mask as an 8-bit "L" image of the photo's (EXIF-rotated) size and where it came from: the
    `<stem>.mask.png` file, else the photo's alpha channel, else (None, "none"): every pixel weighs 1."""
    with Image.open(photo) as im:
        im.seek(0)
        im.load()
        im = ImageOps.exif_transpose(im)
        size = im.size
        f = mask_path(photo)
        if f.is_file():
            with Image.open(f) as m:
                m.load()
                if m.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit: scale to 8 bits (convert("L") would clip)
                    mask = Image.fromarray((np.asarray(m, dtype=np.float64) / 257).round().clip(0, 255)
                                           .astype(np.uint8))
                else:
                    mask = m.convert("L")
            if mask.size != size:
                raise ValueError(f"{f}: mask is {mask.size[0]}x{mask.size[1]} px but its photo {photo.name} is "
                                 f"{size[0]}x{size[1]} (a mask must match its photo pixel for pixel)")
            return mask, "file"
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            return im.convert("RGBA").getchannel("A"), "alpha"
    return None, "none"


def mask_pixels(mask: Image.Image, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """The geometry of `latents.preprocess` (short side to `resolution`, centre crop) applied to a mask, bilinear
    since it holds weights, not colours -> [1, H, W] float in [0, 1]."""
    from dreambench.data.latents import resize_crop
    mask = resize_crop(mask, resolution, center_crop, Image.BILINEAR)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def latent_mask(pixels: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[N, 1, H, W] -> [N, 1, h, w]: each latent pixel weighs the mean of the image pixels it covers (area
    interpolation, as kohya's sd-scripts `apply_masked_loss`)."""
    return F.interpolate(pixels, size=latent_hw, mode="area")


def photo_masks(photos: list[Path], resolution: int, center_crop: bool = True,
                size_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """[N, 1, H, W] pixel masks of the photos (ones where a photo has none), with one log line per source.
    `size_hw`: the photos' aspect-ratio bucket (H, W) instead of the square `resolution`."""
    from dreambench.data.latents import fit_crop
    out, sources = [], {"file": [], "alpha": [], "none": []}
    H, W = size_hw or (resolution, resolution)
    for p in photos:
        mask, src = load_mask(p)
        sources[src].append(p.name)
        if mask is None:
            out.append(torch.ones(1, H, W))
        elif size_hw is None:
            out.append(mask_pixels(mask, resolution, center_crop))
        else:
            m = fit_crop(mask, size_hw, center_crop, Image.BILINEAR)
            out.append(torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None])
    log.info("loss masks: %d from <photo>.mask.png, %d from the alpha channel, %d photo(s) without (weight 1): %s",
             len(sources["file"]), len(sources["alpha"]), len(sources["none"]), sources["none"])
    return torch.stack(out)
