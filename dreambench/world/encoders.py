"""`metrics=toy`: the world's stand-ins for DINO and CLIP (issue 12, item 3), trained by the project and saved
as the same transformers classes the real ones are (ViTModel, CLIPModel with its processor and tokenizer), so
dreambench.metrics.encoders loads them by path with the same code as facebook/dino-vits16 and
openai/clip-vit-base-patch32.

- DINO stands in for an identity-sensitive image encoder. DINO learns that two crops of one image are the
  same thing; here two *views* of one object instance (another pose, another background) are the same thing
  and any other instance is not (InfoNCE on the CLS token, as SimCLR). The instances are random objects, half
  with an emblem, drawn from a stream that never yields the benchmark's twenty subjects.
- CLIP stands in for an image-text model: CLIP's own contrastive loss on captioned class members (a stream
  apart from the one model=toy is pretrained on).

Both at the world's 32 px (patch 4: 64 tokens), so the metrics cost seconds on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ENCODERS_VERSION = 1
SIZE = 32


@dataclass(frozen=True)
class EncoderRecipe:
    world_seed: int = 0
    seed: int = 0
    instances: int = 3000        # DINO: object instances, VIEWS views each
    dino_steps: int = 1200
    dino_batch: int = 96         # instances per step (two views each)
    captioned: int = 10000       # CLIP: captioned members
    clip_steps: int = 1200
    clip_batch: int = 128
    threads: int = 2

    def key(self) -> str:
        from dreambench.world.world import WORLD_VERSION
        blob = json.dumps({"encoders": ENCODERS_VERSION, "world": WORLD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


VIEWS = 4


def folder(cache: str | Path, recipe: EncoderRecipe, which: str) -> Path:
    return Path(cache).expanduser() / "toy-encoders" / f"{which}-v{ENCODERS_VERSION}-{recipe.key()}"


# ------------------------------------------------------------------------------------------------ the instances

def instance(seed: int, index: int):
    """A random object with a look of its own (half of them with an emblem), never a benchmark subject (its own
    seed stream, kind 7)."""
    from dreambench.world.scene import CLASSES, MARKS, PATTERNS, Thing, random_colour
    from dreambench.world.world import _rng
    rng = _rng(seed, 7, index)
    mark = str(rng.choice(MARKS)) if rng.uniform() < 0.5 else None
    return Thing(str(rng.choice(list(CLASSES))), random_colour(rng), str(rng.choice(PATTERNS)), random_colour(rng),
                 aspect=float(rng.uniform(0.85, 1.15)), mark=mark, mark_colour=random_colour(rng),
                 mark_at=(float(rng.uniform(0.35, 0.65)), float(rng.uniform(0.45, 0.7))),
                 mark_size=float(rng.uniform(0.16, 0.22)))


def view(thing, seed: int, index: int, k: int):
    from dreambench.world.scene import CONTEXTS, Scene
    from dreambench.world.world import _rng
    rng = _rng(seed, 8, index, k)
    return Scene(thing, str(rng.choice(list(CONTEXTS))), height=float(rng.uniform(0.4, 0.62)),
                 x=float(rng.uniform(0.38, 0.62)), ground=float(rng.uniform(0.83, 0.94)),
                 tilt=float(rng.uniform(-12, 12)), mirror=bool(rng.uniform() < 0.5), seed=int(rng.integers(2**31)))


def _views_chunk(args: tuple[int, int, int]) -> np.ndarray:
    from dreambench.world.scene import render
    seed, start, stop = args
    return np.stack([[np.asarray(render(view(instance(seed, i), seed, i, k), SIZE)) for k in range(VIEWS)]
                     for i in range(start, stop)])


def render_views(seed: int, n: int, progress: bool = True) -> np.ndarray:
    """(n, VIEWS, 32, 32, 3) uint8."""
    from tqdm.auto import tqdm

    from dreambench.utils.threads import usable_cores
    jobs = [(seed, s, min(s + 100, n)) for s in range(0, n, 100)]
    with ProcessPoolExecutor(max(1, usable_cores()[0])) as pool:
        return np.concatenate(list(tqdm(pool.map(_views_chunk, jobs), total=len(jobs), disable=not progress,
                                        desc="toy encoders: render views")))


def _pixels(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> [0, 1], then normalised by the encoder's own statistics (DinoEncoder's ImageNet
    ones, or those of the CLIP processor saved with the model)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# -------------------------------------------------------------------------------------------------------- DINO

def train_dino(recipe: EncoderRecipe, save_dir: Path, progress: bool = True) -> dict:
    from transformers import ViTConfig, ViTModel

    from dreambench.metrics.encoders import IMAGENET_MEAN, IMAGENET_STD
    from dreambench.models.toy import one_cycle

    t0 = time.perf_counter()
    views = render_views(recipe.world_seed, recipe.instances, progress)
    torch.manual_seed(recipe.seed)
    g = np.random.default_rng([recipe.seed, 21])
    model = ViTModel(ViTConfig(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, intermediate_size=192,
                               image_size=SIZE, patch_size=4, layer_norm_eps=1e-6), add_pooling_layer=False)
    head = torch.nn.Sequential(torch.nn.Linear(96, 192), torch.nn.GELU(), torch.nn.Linear(192, 64))
    held = recipe.instances - 200

    def loss():
        idx = g.choice(held, recipe.dino_batch, replace=False)
        a, b = g.choice(VIEWS, 2, replace=False)
        pair = np.concatenate([views[idx, a], views[idx, b]])
        cls = model(pixel_values=_pixels(pair, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state[:, 0]
        z = F.normalize(head(cls), dim=-1)
        za, zb = z.chunk(2)
        logits = za @ zb.T / 0.1
        target = torch.arange(len(idx))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    model.train()
    one_cycle([*model.parameters(), *head.parameters()], recipe.dino_steps, 1e-3, loss, "toy encoders: DINO",
              progress, weight_decay=0.05)
    model.eval()
    model.save_pretrained(str(save_dir), safe_serialization=True)
    # Held-out instances: how often is a view's nearest other view (among 200 instances x 4 views) the same
    # instance? (chance: 3/799)
    with torch.no_grad():
        e = F.normalize(model(pixel_values=_pixels(views[held:].reshape(-1, SIZE, SIZE, 3), IMAGENET_MEAN,
                                                    IMAGENET_STD)).last_hidden_state[:, 0],
                        dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-2)
    owner = torch.arange(len(e)) // VIEWS
    top1 = float((owner[sim.argmax(1)] == owner).float().mean())
    return {"heldout_same_instance_top1": round(top1, 3), "seconds": round(time.perf_counter() - t0, 1)}


# -------------------------------------------------------------------------------------------------------- CLIP

def _full_caption(scene) -> str:
    """Every word the members' captions may leave out: CLIP learns what each word looks like."""
    from dreambench.world.world import PATTERN_WORDS, colour_name_of
    words = ["a"] + (["shiny"] if scene.shiny else [])
    name = colour_name_of(scene.thing.colour)
    if name:
        words.append(name)
    if scene.thing.pattern != "plain":
        words.append(PATTERN_WORDS[scene.thing.pattern])
    words.append(scene.thing.cls)
    if scene.context:
        words.append(scene.context)
    if scene.accessory:
        words.append(scene.accessory)
    return " ".join(words)


def train_clip(recipe: EncoderRecipe, save_dir: Path, progress: bool = True) -> dict:
    from transformers import CLIPConfig, CLIPModel

    from dreambench.metrics.encoders import _clip_image_processor_cls
    from dreambench.models.toy import MAX_TOKENS, build_tokenizer, one_cycle, render_members
    from dreambench.world.world import member

    t0 = time.perf_counter()
    images, _, _, _ = render_members(recipe.world_seed, recipe.captioned, SIZE, progress,
                                  desc="toy encoders: render captioned members", kind=9)
    captions = [_full_caption(member(recipe.world_seed, i, 9)[0]) for i in range(recipe.captioned)]
    tok = build_tokenizer(save_dir)
    torch.manual_seed(recipe.seed)
    g = np.random.default_rng([recipe.seed, 22])
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "max_position_embeddings": MAX_TOKENS, "bos_token_id": tok.bos_token_id,
                         "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 4, "num_attention_heads": 4,
                           "image_size": SIZE, "patch_size": 4},
        projection_dim=64)
    model = CLIPModel(config)
    # CLIP's processor at the world's size: its statistics normalise the training pixels too.
    proc = _clip_image_processor_cls()(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    ids = tok(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    held = recipe.captioned - 500

    def loss():
        idx = g.choice(held, recipe.clip_batch, replace=False)
        return model(input_ids=ids.input_ids[idx], attention_mask=ids.attention_mask[idx],
                     pixel_values=_pixels(images[idx], proc.image_mean, proc.image_std), return_loss=True).loss

    model.train()
    one_cycle(model.parameters(), recipe.clip_steps, 1e-3, loss, "toy encoders: CLIP", progress, weight_decay=0.05)
    model.eval()
    model.save_pretrained(str(save_dir), safe_serialization=True)
    proc.save_pretrained(str(save_dir))
    with torch.no_grad():  # held-out: the right caption among 500 ranked first, and the right image
        out = model(input_ids=ids.input_ids[held:], attention_mask=ids.attention_mask[held:],
                    pixel_values=_pixels(images[held:], proc.image_mean, proc.image_std))
    r = torch.arange(500)
    return {"heldout_text_top1_of_500": round(float((out.logits_per_image.argmax(1) == r).float().mean()), 3),
            "heldout_image_top1_of_500": round(float((out.logits_per_text.argmax(1) == r).float().mean()), 3),
            "seconds": round(time.perf_counter() - t0, 1)}


def is_built(dest: Path) -> bool:
    return (Path(dest) / "encoder.json").is_file()


def ensure_encoders(cache: str | Path, recipe: EncoderRecipe = EncoderRecipe(), progress: bool = True) -> dict:
    """Build the missing ones of the two encoders; {"dino": folder, "clip": folder}."""
    out = {}
    for which, train in (("dino", train_dino), ("clip", train_clip)):
        dest = folder(cache, recipe, which)
        out[which] = dest
        if not is_built(dest):
            _build(dest, ENCODERS_VERSION, recipe, train, progress)
    return out


def _build(dest: Path, version: int, recipe: Any, train: Any, progress: bool) -> None:
    """`train(recipe, folder, progress)` into a temporary folder beside `dest`, with the recipe's thread count and
    the caller's RNG left as it was; its report and the recipe go into encoder.json, then the folder takes dest's
    place in one rename (an interrupted build leaves no half folder under dest's name)."""
    from dreambench.utils.io import safe_rmtree
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    if tmp.exists():
        safe_rmtree(tmp, tmp.parent)
    tmp.mkdir(parents=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            report = train(recipe, tmp, progress)
    finally:
        torch.set_num_threads(threads)
    (tmp / "encoder.json").write_text(json.dumps({"version": version, "recipe": asdict(recipe), **report},
                                                 indent=1))
    if dest.exists():
        safe_rmtree(dest, dest.parent)
    os.replace(tmp, dest)


# ------------------------------------------------------------------------------------------------------- LPIPS

LPIPS_VERSION = 1
LPIPS_FILE = "lpips_alex.safetensors"


@dataclass(frozen=True)
class LpipsRecipe:
    """The world's LPIPS (DIV, Table 3): its own recipe and folder, so adding it rebuilt neither encoder."""
    world_seed: int = 0
    seed: int = 0
    members: int = 6000          # drawings with their class and context (a stream of their own, kind 10)
    steps: int = 1500
    batch: int = 64
    size: int = 64               # the 32 px pictures are scored at 64 px (metrics.lpips.size): AlexNet's stride-4
    threads: int = 2             # first layer leaves 7 x 7 of a 32 px picture, 15 x 15 of a 64 px one

    def key(self) -> str:
        from dreambench.world.world import WORLD_VERSION
        blob = json.dumps({"lpips": LPIPS_VERSION, "world": WORLD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def lpips_folder(cache: str | Path, recipe: LpipsRecipe) -> Path:
    return Path(cache).expanduser() / "toy-encoders" / f"lpips-v{LPIPS_VERSION}-{recipe.key()}"


def train_lpips(recipe: LpipsRecipe, save_dir: Path, progress: bool = True) -> dict:
    """LPIPS's AlexNet trunk, trained to name the class and context of the world's drawings (where the real one is
    ImageNet's classifier), saved as an `lpips.LPIPS(net="alex")` state dict that `metrics.lpips` loads unchanged.
    The linear layers are all ones: LPIPS's uncalibrated variant (`lpips=False`, the sum over channels of the
    unit-normalised features' squared differences), since the world has no human similarity judgments to
    calibrate them on."""
    from PIL import Image
    from safetensors.torch import save_file

    from dreambench.metrics.lpips import LPIPSAlex, to_lpips_input
    from dreambench.models.toy import one_cycle, render_members
    from dreambench.world.judge import CLASS_NAMES, CONTEXT_NAMES

    t0 = time.perf_counter()
    images, _, labels, _ = render_members(recipe.world_seed, recipe.members, SIZE, progress,
                                          desc="toy encoders: render LPIPS's members", kind=10)
    # The scorer's own resize (PIL bicubic), once: uint8 at recipe.size.
    big = np.stack([np.asarray(Image.fromarray(im).resize((recipe.size,) * 2, Image.BICUBIC)) for im in images])
    torch.manual_seed(recipe.seed)
    g = np.random.default_rng([recipe.seed, 23])
    model = LPIPSAlex()
    heads = torch.nn.ModuleList([torch.nn.Linear(256, len(CLASS_NAMES)), torch.nn.Linear(256, len(CONTEXT_NAMES))])
    held = recipe.members - 500
    labels_t = torch.from_numpy(labels)

    def logits(idx, flip=None):
        x = to_lpips_input([Image.fromarray(a) for a in big[idx]])
        if flip is not None:
            x = torch.where(torch.from_numpy(flip).view(-1, 1, 1, 1), x.flip(3), x)
        h = model.net((x - model.shift) / model.scale)[-1].mean(dim=(2, 3))
        return heads[0](h), heads[1](h)

    def loss():
        idx = g.integers(0, held, recipe.batch)
        a, b = logits(idx, g.uniform(size=len(idx)) < 0.5)
        return F.cross_entropy(a, labels_t[idx, 0]) + F.cross_entropy(b, labels_t[idx, 1])

    model.train()
    one_cycle([*model.net.parameters(), *heads.parameters()], recipe.steps, 1e-3, loss, "toy encoders: LPIPS",
              progress, weight_decay=0.05)
    model.eval()
    with torch.no_grad():
        for lin in model.lins:
            lin.model[1].weight.fill_(1.0)
        a, b = logits(np.arange(held, recipe.members))
    state = {"scaling_layer.shift": model.shift.clone(), "scaling_layer.scale": model.scale.clone()}
    state |= {f"net.{k}": v.detach().clone().contiguous() for k, v in model.net.state_dict().items()}
    for i, lin in enumerate(model.lins):  # lpips keeps each linear layer under two names
        state[f"lin{i}.model.1.weight"] = lin.model[1].weight.detach().clone()
        state[f"lins.{i}.model.1.weight"] = lin.model[1].weight.detach().clone()
    save_file(state, str(save_dir / LPIPS_FILE))
    return {"heldout_class_accuracy": round(float((a.argmax(1) == labels_t[held:, 0]).float().mean()), 3),
            "heldout_context_accuracy": round(float((b.argmax(1) == labels_t[held:, 1]).float().mean()), 3),
            "linear_layers": "ones (lpips=False: uncalibrated)", "size": recipe.size,
            "seconds": round(time.perf_counter() - t0, 1)}


def ensure_lpips(cache: str | Path, recipe: LpipsRecipe = LpipsRecipe(), progress: bool = True) -> Path:
    """<cache>/toy-encoders/lpips-v<N>-<hash>/lpips_alex.safetensors, built unless it is there."""
    dest = lpips_folder(cache, recipe)
    if not is_built(dest):
        _build(dest, LPIPS_VERSION, recipe, train_lpips, progress)
    return dest / LPIPS_FILE
