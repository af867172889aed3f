"""`python -m dreambench.world build | sheet`: see docs/TOY_WORLD.md.

build   the world's data set (subjects' photos, prompts) and, unless --no-model, the pretrained toy model,
        into the cache; prints their folders. Each is built once: an unchanged recipe is never rebuilt.
sheet   a contact sheet of the world (members with captions, every subject's photos, one subject under every
        prompt) as a PNG, to look at what the world is.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dreambench.errors import exit_on_user_error


def _cache(arg: Path | None) -> Path:
    from dreambench.data.dreambench import default_cache_root
    return (arg or default_cache_root()).expanduser()


def build(cache: Path, seed: int, model: bool) -> None:
    from dreambench.world.world import ensure_world
    t = time.perf_counter()
    root = ensure_world(cache, seed)
    print(f"toy world data set: {root} ({time.perf_counter() - t:.1f} s)")
    if model:
        from dreambench.models.toy import Recipe, ensure_toy_model
        t = time.perf_counter()
        folder = ensure_toy_model(cache, Recipe(world_seed=seed))
        print(f"toy model: {folder} ({time.perf_counter() - t:.1f} s)")


def sheet(out: Path, seed: int) -> None:
    from dreambench.world.scene import render
    from dreambench.world.world import PROMPTS, contact_sheet, member, photo, prompt_scene, subjects
    members = [render(member(seed, i)[0], 64) for i in range(32)]
    names = subjects(seed)
    photos = [render(photo(t, seed, i, k), 64) for i, t in enumerate(names.values()) for k in range(2)]
    first = next(iter(names.values()))
    prompts = [render(prompt_scene(first, p, seed), 64) for p in PROMPTS]
    parts = [contact_sheet(members, 8, 2), contact_sheet(photos, 8, 2), contact_sheet(prompts, 5, 2)]
    from PIL import Image
    whole = Image.new("RGB", (max(p.width for p in parts), sum(p.height + 16 for p in parts)), (255, 255, 255))
    y = 0
    for p in parts:
        whole.paste(p, (0, y))
        y += p.height + 16
    out.parent.mkdir(parents=True, exist_ok=True)
    whole.save(out)
    print(f"toy world sheet: {out} (32 members, 2 photos of each of {len(names)} subjects, "
          f"{first and next(iter(names))} under the {len(PROMPTS)} prompts)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreambench.world", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="the world's data set and pretrained model, into the cache")
    b.add_argument("--cache", type=Path, help="default: $DREAMBENCH_CACHE or ~/.cache/dreambench")
    b.add_argument("--seed", type=int, default=0, help="the world's seed (default 0)")
    b.add_argument("--no-model", action="store_true", help="only the data set")
    s = sub.add_parser("sheet", help="a contact sheet of the world, as a PNG")
    s.add_argument("out", type=Path, nargs="?", default=Path("toy-world.png"))
    s.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with exit_on_user_error():
        if args.command == "build":
            build(_cache(args.cache), args.seed, not args.no_model)
        else:
            sheet(args.out, args.seed)


if __name__ == "__main__":
    sys.exit(main())
