"""The `prior` config group: each option is one of these classes, built with `hydra.utils.instantiate`."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreambench.prior.cache import ClassImageCache, ClassImageSpec

log = logging.getLogger("dreambench")


@dataclass
class PriorContext:
    """What a provider may need from the run; the pipeline is only built if images must be generated."""
    class_prompt: str
    resolution: int
    guidance: dict[str, Any]
    model_identity: dict[str, Any]
    scheduler_config: dict[str, Any]
    make_render: Callable[[], Callable[[list[str], list[int]], list]]
    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None
    progress: bool = True
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)  # the family's sampling keywords (SD 3.5, Flux)


class NoPrior:
    """prior=none: instance images only, no prior loss."""

    def __init__(self, weight: float = 0.0, **_other_kinds: object):
        # Options of the other kinds (a preset's prior.num_images, say) have nothing to do here.
        self.weight = float(weight)

    def check(self, resolution: int) -> None:
        pass

    def class_images(self, ctx: PriorContext) -> list[Path]:
        return []

    def summary(self) -> dict[str, Any]:
        return {"kind": "none"}


class GeneratedPrior:
    """prior=generated: `num_images` images of the class prompt made by the base model, cached by content."""

    def __init__(self, weight: float = 1.0, num_images: int = 200, batch_size: int = 4, seed: int = 0,
                 cache_dir: str = "~/.cache/dreambench/class-images"):
        self.weight, self.num_images, self.batch_size, self.seed = float(weight), int(num_images), int(batch_size), int(seed)
        self.cache = ClassImageCache(cache_dir)
        self.last: dict[str, Any] = {}

    def check(self, resolution: int) -> None:
        # A full set must fit on the cache's disk: PNG of noise-free renders is well under 3 bytes/px.
        need = self.num_images * resolution * resolution * 3
        root = self.cache.root
        while not root.exists():
            root = root.parent
        free = shutil.disk_usage(root).free
        if need > free:
            raise ValueError(f"prior.num_images={self.num_images} at {resolution}px needs up to {need / 2**30:.1f} GiB "
                             f"but {root} has {free / 2**30:.1f} GiB free (set prior.cache_dir elsewhere)")

    def spec(self, ctx: PriorContext) -> ClassImageSpec:
        g = ctx.guidance
        return ClassImageSpec(
            model=ctx.model_identity, prompt=ctx.class_prompt, negative_prompt=g.get("negative_prompt") or "",
            scheduler=g["scheduler"], scheduler_config=ctx.scheduler_config,
            num_inference_steps=int(g["num_inference_steps"]), guidance_scale=float(g["guidance_scale"]),
            height=ctx.resolution, width=ctx.resolution, seed=self.seed, count=self.num_images,
            guidance_rescale=float(g.get("guidance_rescale") or 0.0), pipeline_kwargs=dict(ctx.pipeline_kwargs))

    def class_images(self, ctx: PriorContext) -> list[Path]:
        spec = self.spec(ctx)
        render: Callable | None = None

        def lazy_render(prompts, seeds):
            nonlocal render
            render = render or ctx.make_render()
            return render(prompts, seeds)

        paths, hit = self.cache.get_or_create(spec, lazy_render, self.batch_size, ctx.rank, ctx.world_size,
                                              ctx.barrier, ctx.progress)
        self.last = {"kind": "generated", "folder": str(paths[0].parent) if paths else None, "cache_hit": hit,
                     "count": len(paths)}
        log.info("class images: %s (%s)", self.last["folder"], "cache hit" if hit else "generated")
        return paths

    def summary(self) -> dict[str, Any]:
        return self.last or {"kind": "generated"}


class FolderPrior:
    """prior=folder: class images the user already has (validated like instance images)."""

    def __init__(self, folder: str, weight: float = 1.0, num_images: int | None = None, on_bad_image: str = "error"):
        self.folder, self.weight = Path(folder).expanduser(), float(weight)
        self.num_images, self.on_bad_image = num_images, on_bad_image
        self.paths: list[Path] = []

    def check(self, resolution: int) -> None:
        from dreambench.data.images import validate_image_folder
        self.paths = validate_image_folder(self.folder, min_size=resolution, on_bad=self.on_bad_image,
                                          what="class images (prior=folder)",
                                          policy_key="prior.on_bad_image")
        if self.num_images:
            if len(self.paths) < self.num_images:
                raise ValueError(f"prior.num_images={self.num_images} but {self.folder} has {len(self.paths)} usable images")
            self.paths = self.paths[: self.num_images]

    def class_images(self, ctx: PriorContext) -> list[Path]:
        if not self.paths:
            self.check(ctx.resolution)
        return self.paths

    def summary(self) -> dict[str, Any]:
        return {"kind": "folder", "folder": str(self.folder), "count": len(self.paths)}
