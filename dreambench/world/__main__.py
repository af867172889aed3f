"""`python -m dreambench.world build | check | configs | path | sheet`: see docs/TOY_WORLD.md.

build   the world's data set (subjects' photos, prompts) and, unless --no-model, the pretrained toy model
        (model=toy) and, unless --no-encoders, the toy encoders and LPIPS (metrics=toy), into the cache; prints their
        folders. Each is built once: an unchanged recipe is never rebuilt.
check   how well model=toy draws what a class prompt names, judged by a classifier of the world's drawings:
        class and context accuracy, and a grid of the images (rows: classes, columns: contexts).
configs write conf/experiment/toy_<subject>.yaml for every subject (what `+experiment=toy_ball1` reads).
path    the folder of one built part (world, model, dino, clip; lpips: its file), for scripts: exit 2 when it is not built.
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


def build(cache: Path, seed: int, model: bool, encoders: bool = True) -> None:
    from dreambench.world.world import ensure_world
    t = time.perf_counter()
    root = ensure_world(cache, seed)
    print(f"toy world data set: {root} ({time.perf_counter() - t:.1f} s)")
    if model:
        from dreambench.models.toy import Recipe, ensure_toy_model
        t = time.perf_counter()
        folder = ensure_toy_model(cache, Recipe(world_seed=seed))
        print(f"toy model: {folder} ({time.perf_counter() - t:.1f} s)")
    if model and encoders:
        from dreambench.world.encoders import EncoderRecipe, ensure_encoders
        t = time.perf_counter()
        enc = ensure_encoders(cache, EncoderRecipe(world_seed=seed))
        print(f"toy encoders: {enc['dino']}, {enc['clip']} ({time.perf_counter() - t:.1f} s)")
        from dreambench.world.encoders import LpipsRecipe, ensure_lpips
        t = time.perf_counter()
        print(f"toy LPIPS (DIV): {ensure_lpips(cache, LpipsRecipe(world_seed=seed))} ({time.perf_counter() - t:.1f} s)")


def check(cache: Path, out: Path, seed: int) -> None:
    from dreambench.world.check import check_encoders, check_toy_model
    from dreambench.world.world import ensure_world
    # Every part must be built already: checking never starts a 20-minute build.
    folder = path(cache, "model", seed)
    enc = {w: path(cache, w, seed) for w in ("dino", "clip")}
    e = check_encoders(enc["dino"], enc["clip"], ensure_world(cache, seed), seed, path(cache, "lpips", seed))
    import json
    print("encoders:", json.dumps(e))
    r = check_toy_model(folder, out, seed)
    (out / "encoders.json").write_text(json.dumps(e, indent=1))
    print(f"class accuracy {r['class_accuracy']:.2f} (chance {r['chance']['class']:.2f}), context accuracy "
          f"{r['context_accuracy']:.2f} (chance {r['chance']['context']:.2f}) over {r['images']} images; judge on "
          f"held-out drawings: class {r['judge_heldout_class_accuracy']:.2f}, context "
          f"{r['judge_heldout_context_accuracy']:.2f}; grid and numbers in {out}")


def path(cache: Path, what: str, seed: int) -> Path:
    from dreambench.errors import UserError
    from dreambench.models.toy import Recipe, folder_name
    from dreambench.models.toy import is_built as model_built
    from dreambench.world.encoders import LPIPS_FILE, EncoderRecipe, LpipsRecipe, lpips_folder
    from dreambench.world.encoders import folder as encoder_folder
    from dreambench.world.encoders import is_built as encoder_built
    from dreambench.world.world import is_built as world_built
    from dreambench.world.world import world_folder
    if what == "world":
        folder = world_folder(cache, seed)
        built, name = world_built(folder, seed), "world"
    elif what == "model":
        folder = cache / folder_name(Recipe(world_seed=seed))
        built, name = model_built(folder), "model"
    elif what == "lpips":
        folder = lpips_folder(cache, LpipsRecipe(world_seed=seed))
        built, name = encoder_built(folder), "LPIPS"
        folder = folder / LPIPS_FILE
    else:  # the folder's name says which encoder
        folder = encoder_folder(cache, EncoderRecipe(world_seed=seed), what)
        built, name = encoder_built(folder), "encoder"
    if not built:
        raise UserError(f"no toy {name} at {folder}: build it first with python -m dreambench.world build")
    return folder


def sheet(out: Path, seed: int) -> None:
    from dreambench.world.scene import render
    from dreambench.world.world import PROMPTS, contact_sheet, member, photo, prompt_scene, subjects
    members = [render(member(seed, i)[0], 64) for i in range(32)]
    names = subjects(seed)
    photos = [render(photo(t, seed, i, k), 64) for i, t in enumerate(names.values()) for k in range(2)]
    first = next(iter(names))
    prompts = [render(prompt_scene(names[first], p, seed), 64) for p in PROMPTS]
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
          f"{first} under the {len(PROMPTS)} prompts)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreambench.world", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="the world's data set, pretrained model and encoders, into the cache")
    b.add_argument("--cache", type=Path, help="default: $DREAMBENCH_CACHE or ~/.cache/dreambench")
    b.add_argument("--seed", type=int, default=0, help="the world's seed (default 0)")
    b.add_argument("--no-model", action="store_true", help="only the data set")
    b.add_argument("--no-encoders", action="store_true",
                   help="the data set and model=toy only, not the metrics=toy encoders (~20 min more): what training "
                        "needs, not evaluation")
    c = sub.add_parser("check", help="class and context accuracy of model=toy's class prompts, and their grid")
    c.add_argument("--cache", type=Path, help="default: $DREAMBENCH_CACHE or ~/.cache/dreambench")
    c.add_argument("--out", type=Path, default=Path("toy-check"), help="folder for check.json and the grid")
    c.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("configs", help="write conf/experiment/toy_<subject>.yaml for every subject")
    e.add_argument("--conf", type=Path, default=Path(__file__).resolve().parents[2] / "conf" / "experiment")
    w = sub.add_parser("path", help="the folder of a built part of the world (for scripts)")
    w.add_argument("what", choices=["world", "model", "dino", "clip", "lpips"], nargs="?", default="world")
    w.add_argument("--cache", type=Path, help="default: $DREAMBENCH_CACHE or ~/.cache/dreambench")
    w.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("sheet", help="a contact sheet of the world, as a PNG")
    s.add_argument("out", type=Path, nargs="?", default=Path("toy-world.png"))
    s.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with exit_on_user_error():
        if args.command == "build":
            # Before torch is imported: the same recipe built on AVX-512 kernels is other weights (toy.json records
            # which kernels built a model).
            from dreambench.utils.kernels import pin_avx2_kernels
            pin_avx2_kernels()
            build(_cache(args.cache), args.seed, not args.no_model, not args.no_encoders)
        elif args.command == "configs":
            from dreambench.world.world import experiment_yaml, subjects
            for name, thing in subjects(0).items():
                (args.conf / f"{name}.yaml").write_text(experiment_yaml(name, thing))
            print(f"wrote {len(subjects(0))} experiment files into {args.conf}")
        elif args.command == "check":
            check(_cache(args.cache), args.out, args.seed)
        elif args.command == "path":
            print(path(_cache(args.cache), args.what, args.seed))
        else:
            sheet(args.out, args.seed)


if __name__ == "__main__":
    sys.exit(main())
