"""The toy world as a data set: class members with captions (what `model=toy` is pretrained on) and subjects
with 3-6 photos each, written in DreamBench's folder layout so every tool reads it unchanged.

Members and subjects come from disjoint seeds, and no member ever carries an emblem (scene.MARKS), so
nothing the model is pretrained on shows a subject. Everything is a function of (seed, index): the same world
on every machine and in every process.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from dreambench.world.scene import (
    ACCESSORIES,
    CLASSES,
    COLOURS,
    CONTEXTS,
    MARKS,
    PATTERNS,
    Scene,
    Thing,
    random_colour,
    render,
    silhouette,
    with_colour,
)

WORLD_VERSION = 1  # bump when a drawing, the subjects or the layout change: the folder name carries it
PHOTO_SIZE = 128   # px, the subjects' photos (the model trains at its own resolution, as on DreamBench)
SUBJECTS_PER_CLASS = 2
RECONTEXT = [c for c in CONTEXTS if c and c != "in the desert"]  # 15 prompt contexts; the desert is only pretraining
PROPERTIES = ["red", "purple", "blue", "yellow", "shiny"]
# DreamBench-style prompts: 15 recontextualisations, 5 accessories, 5 property changes. {0}: identifier, {1}: class.
PROMPTS = ([f"a {{0}} {{1}} {c}" for c in RECONTEXT] + [f"a {{0}} {{1}} {a}" for a in ACCESSORIES]
           + [f"a {p} {{0}} {{1}}" for p in PROPERTIES])
PHOTO_CONTEXTS = ["", "", "on top of a wooden floor", "on top of a white rug", "on top of green grass"]
# Every word a caption or prompt of the world uses (the toy tokenizer gives each one token).
WORDS = sorted({w for text in [*CONTEXTS, *ACCESSORIES, *PROPERTIES, *COLOURS, *CLASSES, "a photo of",
                               "dotted striped checked banded"] for w in text.split()})


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def _colour(rng: np.random.Generator) -> tuple[str | None, tuple[int, int, int]]:
    """A named colour (jittered) 70% of the time, else any colour; (its name or None, RGB)."""
    if rng.uniform() < 0.7:
        name = str(rng.choice(list(COLOURS)))
        c = tuple(int(np.clip(v + rng.integers(-18, 19), 0, 255)) for v in COLOURS[name])
        return name, c
    return None, random_colour(rng)


def colour_name_of(rgb: tuple[int, int, int], within: float = 60.0) -> str | None:
    """The named colour nearest to `rgb` when one is within `within` (RGB distance), else None."""
    name, c = min(COLOURS.items(), key=lambda kv: sum((a - b) ** 2 for a, b in zip(kv[1], rgb)))
    return name if sum((a - b) ** 2 for a, b in zip(c, rgb)) ** 0.5 <= within else None


PATTERN_WORDS = {"stripes": "striped", "dots": "dotted", "checks": "checked", "band": "banded"}


def member(seed: int, index: int, kind: int = 1) -> tuple[Scene, str]:
    """The index-th pretraining example: a random member of a random class in a random context, and its
    caption ("a shiny red striped cup on the beach wearing a red hat", most words optional). kind: an
    independent stream of members (1: pretraining; 6: the judge's)."""
    rng = _rng(seed, kind, index)
    cls = str(rng.choice(list(CLASSES)))
    colour_name, colour = _colour(rng)
    pattern = str(rng.choice(PATTERNS, p=[0.5, 0.15, 0.15, 0.1, 0.1]))
    thing = Thing(cls, colour, pattern, random_colour(rng), aspect=float(rng.uniform(0.85, 1.15)))
    context = str(rng.choice(list(CONTEXTS)))
    accessory = str(rng.choice(ACCESSORIES)) if rng.uniform() < 0.15 else None
    shiny = bool(rng.uniform() < 0.1)
    scene = Scene(thing, context, accessory, shiny, height=float(rng.uniform(0.35, 0.62)),
                  x=float(rng.uniform(0.36, 0.64)), ground=float(rng.uniform(0.82, 0.94)),
                  tilt=float(rng.uniform(-12, 12)), mirror=bool(rng.uniform() < 0.5), seed=int(rng.integers(2**31)))
    words = ["a"]
    if shiny:
        words.append("shiny")
    if colour_name and rng.uniform() < 0.6:
        words.append(colour_name)
    if pattern != "plain" and rng.uniform() < 0.5:
        words.append(PATTERN_WORDS[pattern])
    words.append(cls)
    if context and rng.uniform() < 0.9:  # now and then the context is left unsaid, as in real captions
        words.append(context)
    if accessory:
        words.append(accessory)
    return scene, " ".join(words)


def subjects(seed: int) -> dict[str, Thing]:
    """name -> the subject: SUBJECTS_PER_CLASS per class, each with fixed colours, a non-plain pattern,
    proportions and an emblem that no member has."""
    out: dict[str, Thing] = {}
    for ci, cls in enumerate(CLASSES):
        for k in range(SUBJECTS_PER_CLASS):
            rng = _rng(seed, 2, ci, k)
            thing = Thing(cls, random_colour(rng), str(rng.choice(PATTERNS[1:])), random_colour(rng),
                          aspect=float(rng.uniform(0.85, 1.15)), mark=str(rng.choice(MARKS)),
                          mark_colour=random_colour(rng),
                          mark_at=(float(rng.uniform(0.35, 0.65)), float(rng.uniform(0.45, 0.7))),
                          mark_size=float(rng.uniform(0.16, 0.22)))
            out[f"toy_{cls}{k + 1}"] = thing  # also the name of its experiment: +experiment=toy_ball1
    return out


def photo(thing: Thing, seed: int, subject_index: int, k: int) -> Scene:
    """The k-th photo of a subject: its own look, a new pose and a plain everyday background."""
    rng = _rng(seed, 3, subject_index, k)
    return Scene(thing, str(rng.choice(PHOTO_CONTEXTS)), height=float(rng.uniform(0.45, 0.62)),
                 x=float(rng.uniform(0.4, 0.6)), ground=float(rng.uniform(0.84, 0.93)),
                 tilt=float(rng.uniform(-10, 10)), mirror=bool(rng.uniform() < 0.5), seed=int(rng.integers(2**31)))


def prompt_scene(thing: Thing, template: str, seed: int) -> Scene:
    """What a DreamBench-style prompt of the world asks for, drawn exactly: the reference a generated image of
    a subject can be compared with (tests, the encoders' checks)."""
    rng = _rng(seed, 4)
    text = template.format("", "").split()
    phrase = " ".join(text)
    context = next((c for c in CONTEXTS if c and phrase.endswith(c)), "")
    accessory = next((a for a in ACCESSORIES if phrase.endswith(a)), None)
    colour = next((p for p in PROPERTIES[:-1] if text[1:2] == [p]), None)
    return Scene(with_colour(thing, colour) if colour else thing, context, accessory, shiny="shiny" in text[:2],
                 height=0.52, x=0.5, ground=0.9, tilt=float(rng.uniform(-5, 5)), seed=int(rng.integers(2**31)))


def index_text(classes: dict[str, str], prompts=PROMPTS) -> str:
    """prompts_and_classes.txt in DreamBench's own format (dreambench.data.dreambench.parse_index reads it), for
    subjects {name: class noun} and prompt templates ("a {0} {1} in the jungle")."""
    lines = ["Classes", "", "subject_name,class", *[f"{n},{c}" for n, c in classes.items()], "", "Prompts", ""]
    block = ",\n".join(f"'{p}'.format(unique_token, class_token)" for p in prompts)
    for title in ("Object Prompts", "Live Subject Prompts"):  # no toy class is live; both lists are the same
        lines += [title, "", "prompt_list = [", block, "]", ""]
    return "\n".join(lines)


def write_world(root: str | Path, seed: int = 0, progress: bool = True) -> Path:
    """The subjects' photos and prompts as a DreamBench folder at `root` (built aside, then renamed)."""
    from tqdm.auto import tqdm

    from dreambench.data.sidecars import MASK_SUFFIX
    from dreambench.utils.io import safe_rmtree

    root = Path(root).expanduser()
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    if tmp.exists():
        safe_rmtree(tmp, tmp.parent)
    tmp.mkdir(parents=True)
    names = subjects(seed)
    for si, (name, thing) in enumerate(tqdm(list(names.items()), desc="toy world: subjects", disable=not progress)):
        (tmp / name).mkdir()
        n = int(_rng(seed, 5, si).integers(3, 7))  # 3-6 photos, as DreamBench's 4-6
        for k in range(n):
            scene = photo(thing, seed, si, k)
            render(scene, PHOTO_SIZE).save(tmp / name / f"{k:02d}.png")
            # The object's silhouette beside each photo (dreambench.data.sidecars): what loss.mask=true trains on.
            silhouette(scene, PHOTO_SIZE).save(tmp / name / f"{k:02d}{MASK_SUFFIX}")
    (tmp / "prompts_and_classes.txt").write_text(index_text({n: t.cls for n, t in names.items()}))
    (tmp / "world.json").write_text(json.dumps({
        "version": WORLD_VERSION, "seed": seed, "photo_size": PHOTO_SIZE, "masks": True,
        "subjects": {n: asdict(t) for n, t in names.items()}}, indent=1))
    (tmp / "LICENSE.md").write_text("Generated by dreambench.world (procedural drawings): the project's licence.\n")
    if root.exists():
        safe_rmtree(root, root.parent)
    os.replace(tmp, root)
    return root


def is_built(root: Path, seed: int) -> bool:
    marker = root / "world.json"
    if not marker.is_file():
        return False
    meta = json.loads(marker.read_text())
    # The subjects too: a folder written before a subject's name or look changed is rewritten (json: lists).
    same = json.loads(json.dumps({n: asdict(t) for n, t in subjects(seed).items()})) == meta.get("subjects")
    # "masks": the photos' silhouettes, added without a version bump (a folder without them is rewritten, the models
    # built on the world stay valid: they never read its photos).
    return meta.get("version") == WORLD_VERSION and meta.get("seed") == seed and same and meta.get("masks") is True


def world_folder(cache_dir: str | Path, seed: int = 0) -> Path:
    return Path(cache_dir).expanduser() / f"toy-world-v{WORLD_VERSION}-seed{seed}"


def ensure_world(cache_dir: str | Path, seed: int = 0, progress: bool = True) -> Path:
    """The world's data set folder under the cache, written once (the folder name carries version and seed)."""
    root = world_folder(cache_dir, seed)
    if not is_built(root, seed):
        write_world(root, seed, progress)
    return root


def contact_sheet(images: list[Image.Image], columns: int, scale: int = 1) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    return sheet.resize((sheet.width * scale, sheet.height * scale), Image.Resampling.NEAREST) if scale > 1 else sheet


def experiment_yaml(name: str, thing: Thing, seed: int = 0) -> str:
    """conf/experiment/<name>.yaml of a subject of the world: `+experiment=toy_ball1`, as `+experiment=dog`."""
    return f"""# @package _global_
# Toy world subject "{name}": class "{thing.cls}" (docs/TOY_WORLD.md). Written by
# `python -m dreambench.world configs`; tests/test_world.py keeps it in step with the world.
defaults:
  - /preset: toy
  - override /model: toy
  - override /metrics: toy
paths:
  dataset_dir: ${{paths.cache_dir}}/toy-world-v{WORLD_VERSION}-seed{seed}
data:
  subject: {name}
  class_noun: {thing.cls}
  live: false
"""
