"""Class images cached by content.

diffusers' DreamBooth example counts the files in the class folder and tops them up: a folder made with
another prompt, model or sampler is silently reused. Here the folder name is the SHA-256 of everything that
determines the images (base model identity, prompts, scheduler, steps, guidance, resolution, seed, count);
a manifest written last marks the set complete, so a killed generation is never mistaken for a finished one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreambench.utils.io import atomic_write_json, safe_rmtree

MANIFEST = "manifest.json"
log = logging.getLogger("dreambench")


@dataclass(frozen=True)
class ClassImageSpec:
    model: dict[str, Any]
    prompt: str
    negative_prompt: str
    scheduler: str
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    seed: int = 0
    count: int = 200
    guidance_rescale: float = 0.0  # guidance.guidance_rescale (Lin et al. 2024 §3.4)
    # The model family's own sampling keywords (SD 3.5 / Flux: max_sequence_length, which changes the conditioning).
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not d["guidance_rescale"]:  # off: the key (and so every existing cache folder) is what it was before
            del d["guidance_rescale"]
        if not d["pipeline_kwargs"]:  # SD / SDXL: none, and their keys stay what they were
            del d["pipeline_kwargs"]
        return json.loads(json.dumps(d, sort_keys=True, default=str))

    def image_seed(self, i: int) -> int:
        # Image i depends on (seed, i) only: batch size and number of ranks do not change the set.
        return self.seed * 1_000_003 + i


def cache_key(spec: ClassImageSpec) -> str:
    return hashlib.sha256(json.dumps(spec.as_dict(), sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _exclusive(path: Path):
    """An advisory lock (flock) held for the block; released by the kernel if the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ClassImageCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    def folder(self, spec: ClassImageSpec) -> Path:
        return self.root / cache_key(spec)[:24]

    @staticmethod
    def _names(spec: ClassImageSpec) -> list[str]:
        return [f"{i:05d}.png" for i in range(spec.count)]

    def lookup(self, spec: ClassImageSpec) -> list[Path] | None:
        folder = self.folder(spec)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        # The full spec is compared, not only the key prefix in the folder name.
        if manifest.get("key") != cache_key(spec) or manifest.get("spec") != spec.as_dict():
            return None
        paths = [folder / n for n in self._names(spec)]
        return paths if all(p.is_file() for p in paths) else None

    def get_or_create(self, spec: ClassImageSpec, render: Callable[[list[str], list[int]], list],
                      batch_size: int = 4, rank: int = 0, world_size: int = 1,
                      barrier: Callable[[], None] = lambda: None, progress: bool = True) -> tuple[list[Path], bool]:
        """Returns (paths, hit). `render(prompts, seeds)` makes PIL images. On a miss every rank renders its
        share (i = rank, rank + world_size, ...) into one partial folder; rank 0 then seals it."""
        hit = self.lookup(spec)
        if hit is not None:
            return hit, True
        if world_size == 1:
            # Two runs of one class at once (experiments/tables.sh JOBS=2, a sweep's parallel trials): the second
            # waits for the first and reuses its images, instead of rendering the same set into the same partial
            # folder and failing when the first renames it into place. The ranks of one distributed run
            # coordinate through `barrier` instead.
            with _exclusive(self.root / f"{self.folder(spec).name}.lock"):
                hit = self.lookup(spec)
                if hit is not None:
                    return hit, True
                return self._create(spec, render, batch_size, rank, world_size, barrier, progress)
        return self._create(spec, render, batch_size, rank, world_size, barrier, progress)

    def _create(self, spec: ClassImageSpec, render: Callable[[list[str], list[int]], list], batch_size: int,
                rank: int, world_size: int, barrier: Callable[[], None], progress: bool) -> tuple[list[Path], bool]:
        barrier()  # every rank has seen the miss before rank 0 may seal the folder
        folder = self.folder(spec)
        partial = folder.with_name(folder.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        names = self._names(spec)
        # Files already in a partial folder were renamed into place complete; a killed run resumes from them.
        todo = [i for i in range(rank, spec.count, world_size) if not (partial / names[i]).is_file()]
        log.info("class images: rank %d of %d renders %d of %d", rank, world_size, len(todo), spec.count)
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc=f"class images [{rank}]" if world_size > 1 else "class images",
                   unit="img", disable=not progress)
        for j in range(0, len(todo), batch_size):
            idx = todo[j:j + batch_size]
            images = render([spec.prompt] * len(idx), [spec.image_seed(i) for i in idx])
            for i, im in zip(idx, images):
                tmp = partial / f".{names[i]}.tmp-{os.getpid()}"
                im.save(tmp, format="PNG")
                os.replace(tmp, partial / names[i])
            bar.update(len(idx))
        bar.close()
        barrier()
        if rank == 0:
            missing = [n for n in names if not (partial / n).is_file()]
            if missing:
                raise RuntimeError(f"class-image generation left {len(missing)} images missing in {partial}")
            atomic_write_json(partial / MANIFEST, {"key": cache_key(spec), "spec": spec.as_dict(), "files": names})
            if folder.exists() or folder.is_symlink():  # an incomplete or mismatched set under our own key
                safe_rmtree(folder, self.root)  # ours to replace, but never through a link out of the cache
            os.replace(partial, folder)
        barrier()
        paths = self.lookup(spec)
        if paths is None:
            raise RuntimeError(f"class-image cache {folder} is incomplete after generation")
        return paths, False
