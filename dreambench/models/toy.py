"""`model=toy`: a Stable-Diffusion-shaped model pretrained by the project on the toy world (dreambench.world).

The same parts as SD 1.5 (AutoencoderKL, a CLIP text encoder and its BPE tokenizer, a cross-attention
UNet2DConditionModel, SD's scaled-linear noise schedule with epsilon prediction), at 32 px, saved in the
diffusers folder format and loaded through the same `from_pretrained` as SD 1.5. It learns the world's classes,
colours, patterns, contexts and accessories from captioned class members only; it never sees a subject's photo
or an emblem, so what a DreamBooth run teaches it is measurable.

Build: `python -m dreambench.world build` (docs/TOY_WORLD.md). Four stages, each with a progress bar:
render the members, fit the autoencoder, encode the members to latents, train the UNet and text encoder
together (with 10% empty captions, for classifier-free guidance). The folder name carries a hash of the recipe,
so a changed recipe is a new model and an unchanged one is never rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from dreambench.models.tiny import SD_SCALING_FACTOR, give_sd_latent_scale, sd15_scheduler

TOY_VERSION = 4
# The longest caption of the world is 20 tokens with its start and end: SD's 77 would spend most of the text
# encoder's and cross-attention's work on padding.
MAX_TOKENS = 32
IDENTIFIERS = ["sks", "xjy", "zwx", "olis", "qwe", "vbn"]  # rare identifiers a run may choose


@dataclass(frozen=True)
class Recipe:
    """Everything the toy model is a function of (its hash names the folder)."""
    world_seed: int = 0
    seed: int = 0
    resolution: int = 32
    members: int = 12000         # captioned class members rendered for pretraining
    vae_steps: int = 1000        # held-out MSE 0.026 after 200 steps, 0.007 after 800, 0.0056 after 1400
    vae_batch: int = 16
    unet_steps: int = 2100
    unet_batch: int = 32
    unet_lr: float = 1e-3
    min_snr_gamma: float = 5.0   # min-SNR-γ loss weights (Hang et al. 2023): ~3x fewer steps to the same loss
    ema_decay: float = 0.999     # the saved UNet and text encoder are the EMA of the trained ones
    # The denoiser's loss on the object's latent pixels (its silhouette, dilated by one) counts 1 + object_weight
    # times the background's: the object is a fifth of a picture, and with equal weights v3 learnt the contexts
    # (0.68 recognised) far better than the classes (0.31). 0 is v3's plain loss.
    object_weight: float = 3.0
    empty_caption: float = 0.1   # share of empty captions (classifier-free guidance)
    # torch threads during the build: another count reduces floats in another order. Not enough for a build that
    # is the same on every machine: the CPU's kernels differ too (docs/TOY_WORLD.md).
    threads: int = 2

    def key(self) -> str:
        from dreambench.world.world import WORLD_VERSION
        blob = json.dumps({"toy": TOY_VERSION, "world": WORLD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def folder_name(recipe: Recipe) -> str:
    return f"toy-sd-v{TOY_VERSION}-{recipe.key()}"


def build_tokenizer(save_dir=None):
    from dreambench.models.tokenizer import build_tiny_tokenizer
    from dreambench.world.world import WORDS
    return build_tiny_tokenizer(save_dir, model_max_length=MAX_TOKENS, words=[*WORDS, *IDENTIFIERS])


class Members(NamedTuple):
    images: np.ndarray      # (N, H, W, 3) uint8
    captions: list[str]
    labels: np.ndarray      # (N, 2) int64: class index, context index
    silhouettes: np.ndarray  # (N, H, W) uint8: the object's coverage of each pixel (255: all object)


def _render_chunk(args: tuple[int, int, int, int, int]) -> Members:
    from dreambench.world.scene import CLASSES, CONTEXTS, render_with_silhouette
    from dreambench.world.world import member
    seed, start, stop, size, kind = args
    imgs, caps, labels, sils = [], [], [], []
    for i in range(start, stop):
        scene, caption = member(seed, i, kind)
        im, sil = render_with_silhouette(scene, size)
        imgs.append(np.asarray(im))
        sils.append(np.asarray(sil))
        caps.append(caption)
        labels.append((list(CLASSES).index(scene.thing.cls), list(CONTEXTS).index(scene.context)))
    return Members(np.stack(imgs), caps, np.array(labels, dtype=np.int64), np.stack(sils))


def render_members(seed: int, n: int, size: int, progress: bool = True, desc: str = "toy model: render members",
                   kind: int = 1) -> Members:
    """n members with captions, labels and silhouettes, rendered on every usable core (the result does not depend
    on how many). kind: another stream of members (1: pretraining)."""
    from tqdm.auto import tqdm

    from dreambench.utils.threads import usable_cores
    chunk = 250
    jobs = [(seed, s, min(s + chunk, n), size, kind) for s in range(0, n, chunk)]
    with ProcessPoolExecutor(max(1, usable_cores()[0])) as pool:
        parts = list(tqdm(pool.map(_render_chunk, jobs), total=len(jobs), desc=desc, disable=not progress))
    return Members(np.concatenate([p.images for p in parts]), [c for p in parts for c in p.captions],
                   np.concatenate([p.labels for p in parts]), np.concatenate([p.silhouettes for p in parts]))


def object_weights(silhouettes: np.ndarray, weight: float) -> torch.Tensor:
    """(N, 1, h, w) loss weights at the latents' size (half the pictures'): 1 on the background, 1 + weight where
    the object's silhouette, averaged to a latent pixel and dilated by one, is; the object's edges, which draw its
    class's shape, count in full."""
    m = torch.from_numpy(silhouettes).float().div(255).unsqueeze(1)
    m = F.max_pool2d(F.avg_pool2d(m, 2), 3, stride=1, padding=1)
    return 1 + weight * m


def per_picture_loss(sq: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """(B,) the squared errors (B, C, h, w) averaged per picture, weighted by `weights` (B, 1, h, w) where given:
    a weighted mean, so a picture's loss keeps its scale however much of it the object covers."""
    if weights is None:
        return sq.mean(dim=(1, 2, 3))
    return (sq * weights).mean(dim=(1, 2, 3)) / weights.mean(dim=(1, 2, 3))


def _to_tensor(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def make_components(recipe: Recipe):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(recipe.seed)
    tokenizer = build_tokenizer()
    # 2x down: 32 px pictures -> 4 x 16 x 16 latents (model=tiny's shapes, so a toy run costs what a test does).
    # No attention in the middle block: at 16 x 16 it cost a quarter of each step and, in the same time, more steps
    # of a plain convolutional autoencoder keep the stripes and emblems that v2's blurred away.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=16, sample_size=recipe.resolution, mid_block_add_attention=False,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=recipe.resolution // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),  # 16x16, 8x8, 4x4; attention at 8x8 and 4x4
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )
    return tokenizer, vae, text_encoder, unet, sd15_scheduler()


def one_cycle(params, steps: int, max_lr: float, loss_fn, desc: str, progress: bool = True,
              weight_decay: float = 0.0) -> None:
    """`steps` AdamW steps on loss_fn() under a one-cycle schedule: the build's small training loops (the
    autoencoder, the world's encoders, the judge), with a progress bar showing the loss."""
    from tqdm.auto import tqdm
    opt = torch.optim.AdamW(params, lr=max_lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for _ in bar:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)


def fit_vae(vae, images: np.ndarray, recipe: Recipe, progress: bool = True) -> float:
    """Reconstruction (MSE + a small KL) with a one-cycle schedule; the final MSE on a held-out batch."""
    g = np.random.default_rng([recipe.seed, 11])
    held = min(256, len(images) // 8)  # the last ones: never trained on, the reported MSE's

    def loss():
        x = _to_tensor(images[g.integers(0, len(images) - held, recipe.vae_batch)])
        post = vae.encode(x).latent_dist
        return F.mse_loss(vae.decode(post.mean).sample, x) + 1e-6 * post.kl().mean()

    vae.train()
    one_cycle(vae.parameters(), recipe.vae_steps, 2e-3, loss, "toy model: autoencoder", progress)
    vae.eval()
    with torch.no_grad():
        x = _to_tensor(images[-held:])
        return F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x).item()


@torch.no_grad()
def encode_all(vae, images: np.ndarray, progress: bool = True) -> torch.Tensor:
    from tqdm.auto import tqdm
    out = [vae.encode(_to_tensor(images[i:i + 128])).latent_dist.mean * SD_SCALING_FACTOR
           for i in tqdm(range(0, len(images), 128), desc="toy model: encode", disable=not progress)]
    return torch.cat(out)


def train_denoiser(unet, text_encoder, tokenizer, scheduler, latents: torch.Tensor, captions: list[str],
                   recipe: Recipe, progress: bool = True, weights: torch.Tensor | None = None) -> list[float]:
    """UNet and text encoder from scratch, epsilon loss at uniform timesteps (SD's recipe) with min-SNR-γ
    weights and, where `weights` (N, 1, h, w) are given, each latent pixel weighted by them (a weighted mean per
    picture); the EMA of the weights is copied into the models at the end. The loss curve (mean per 100 steps,
    unweighted: comparable across recipes)."""
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from dreambench.losses import min_snr_weights, snr
    g = torch.Generator().manual_seed(recipe.seed + 12)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids[0]
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=1e-2)
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / recipe.unet_steps))) * 0.95 + 0.05)
    acp = scheduler.alphas_cumprod.float()
    ema = EMAModel(params, decay=recipe.ema_decay, use_ema_warmup=False)
    unet.train()
    text_encoder.train()
    curve, acc = [], []
    bar = tqdm(range(recipe.unet_steps), desc="toy model: denoiser", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(latents), (recipe.unet_batch,), generator=g)
        x0 = latents[idx]
        tok = ids[idx].clone()
        drop = torch.rand(len(idx), generator=g) < recipe.empty_caption
        tok[drop] = empty
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = text_encoder(tok)[0]
        sq = F.mse_loss(unet(xt, t, cond).sample, noise, reduction="none")
        per_sample = sq.mean(dim=(1, 2, 3))
        fitted = per_picture_loss(sq, None if weights is None else weights[idx])
        loss = (fitted * min_snr_weights(snr(acp, t), recipe.min_snr_gamma, "epsilon")).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        acc.append(per_sample.mean().item())
        if (step + 1) % 100 == 0:
            curve.append(float(np.mean(acc)))
            acc = []
            bar.set_postfix(loss=f"{curve[-1]:.4f}", refresh=False)
    ema.copy_to(params)
    unet.eval()
    text_encoder.eval()
    return curve


def build_toy_pipeline(recipe: Recipe, progress: bool = True):
    """(the pipeline, a report of the build: times, losses)."""
    from diffusers import StableDiffusionPipeline

    # Which CPU kernels built it: the same recipe on other kernels is other weights (dreambench/utils/kernels.py).
    report: dict = {"recipe": asdict(recipe), "cpu_kernels": torch.backends.cpu.get_cpu_capability()}
    t0 = time.perf_counter()
    images, captions, _, silhouettes = render_members(recipe.world_seed, recipe.members, recipe.resolution, progress)
    report["render_s"] = round(time.perf_counter() - t0, 1)
    tokenizer, vae, text_encoder, unet, scheduler = make_components(recipe)
    t = time.perf_counter()
    report["vae_heldout_mse"] = round(fit_vae(vae, images, recipe, progress), 5)
    report["latent_rescale"] = round(give_sd_latent_scale(vae, _to_tensor(images[:256])), 4)
    report["vae_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    latents = encode_all(vae, images, progress)
    report["encode_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    report["denoiser_loss_per_100_steps"] = [round(v, 4) for v in
                                             train_denoiser(unet, text_encoder, tokenizer, scheduler, latents,
                                                            captions, recipe, progress,
                                                            object_weights(silhouettes, recipe.object_weight)
                                                            if recipe.object_weight else None)]
    report["denoiser_s"] = round(time.perf_counter() - t, 1)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe, report


def is_built(folder: Path) -> bool:
    return (Path(folder) / "toy.json").is_file()


def ensure_toy_model(cache_dir: str | Path, recipe: Recipe = Recipe(), progress: bool = True) -> Path:
    """Build the toy model into <cache>/toy-sd-v<N>-<recipe hash> unless it is there; returns the folder."""
    from dreambench.utils.io import safe_rmtree

    folder = Path(cache_dir).expanduser() / folder_name(recipe)
    if is_built(folder):
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            pipe, report = build_toy_pipeline(recipe, progress)
    finally:
        torch.set_num_threads(threads)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "toy.json").write_text(json.dumps({"version": TOY_VERSION, **report}, indent=1))
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:
        if not is_built(folder):
            raise
        safe_rmtree(tmp, folder.parent)
    return folder
