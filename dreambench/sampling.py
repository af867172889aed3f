"""Sampling: a diffusers pipeline assembled from components already in memory, fixed-seed generation, grids."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import diffusers
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm


def make_scheduler(name: str, base_config: Mapping[str, Any], **overrides: Any):
    """A sampling scheduler of class `name` (a diffusers class, e.g. "DPMSolverMultistepScheduler") built
    from the base model's scheduler config, so the noise schedule and prediction type stay the model's."""
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"guidance.scheduler={name!r} is not a diffusers scheduler class")
    own = str(base_config.get("_class_name") or "")
    if own.startswith("FlowMatch") and not name.startswith("FlowMatch"):
        # A rectified-flow model (SD 3.5) samples with a flow-matching scheduler; guidance.scheduler's default
        # (DDIM) and the other DDPM-family samplers do not apply to it: the model's own scheduler class is used.
        cls = getattr(diffusers, own)
    return cls.from_config(dict(base_config), **overrides)


def build_pipeline(unet, vae, text_encoder, tokenizer, scheduler) -> diffusers.StableDiffusionPipeline:
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], guidance: Mapping[str, Any], batch_size: int = 4,
             progress: bool = True, desc: str = "sampling", output_type: str = "pil") -> list:
    """One image per (prompt, seed); image i depends only on (prompt i, seed i), never on the batch size,
    because each image gets its own CPU generator (device-independent noise)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    out: list = []
    height = guidance.get("height") or None
    width = guidance.get("width") or None
    negative = guidance.get("negative_prompt") or None
    rescale = float(guidance.get("guidance_rescale") or 0.0)
    extra: dict[str, Any] = dict(getattr(pipe, "_dreambench_call_kwargs", None) or {})  # the family's (SD3)
    params = inspect.signature(pipe.__call__).parameters
    if "guidance_rescale" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        # Lin et al. 2024 §3.4 (0.7 there, with a zero-terminal-SNR model); 0.0 is diffusers' default: no rescale.
        extra["guidance_rescale"] = rescale
    elif rescale:
        raise ValueError(f"guidance.guidance_rescale={rescale}: {type(pipe).__name__} has no guidance rescale")
    bar = tqdm(total=len(prompts), desc=desc, unit="img", disable=not progress, leave=False)
    for i in range(0, len(prompts), batch_size):
        p, s = list(prompts[i:i + batch_size]), seeds[i:i + batch_size]
        result = pipe(
            prompt=p,
            negative_prompt=[negative] * len(p) if negative else None,
            num_inference_steps=int(guidance["num_inference_steps"]),
            guidance_scale=float(guidance["guidance_scale"]),
            height=height, width=width,
            generator=[torch.Generator("cpu").manual_seed(int(x)) for x in s],
            output_type=output_type,
            **extra,
        )
        out.extend(result.images)
        bar.update(len(p))
    bar.close()
    return out


def image_grid(images: Sequence[Image.Image], cols: int | None = None, labels: Sequence[str] | None = None,
               pad: int = 2, min_tile: int = 128) -> Image.Image:
    """A contact sheet; labels (one per image) are drawn under each tile. Images narrower than min_tile (the
    toy world's 32 px) are enlarged by a whole factor with nearest-neighbour, so a person sees their pixels."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    zoom = max(1, math.ceil(min_tile / w))
    w, h = w * zoom, h * zoom
    label_h = 12 if labels else 0
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad + label_h) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x, y = pad + c * (w + pad), pad + r * (h + pad + label_h)
        grid.paste(im.convert("RGB").resize((w, h), Image.NEAREST if zoom > 1 else Image.BICUBIC), (x, y))
        if labels:
            draw.text((x + 1, y + h), str(labels[i])[: max(4, w // 6)], fill="black")
    return grid
