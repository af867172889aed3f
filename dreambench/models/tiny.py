"""`model=tiny` / `model=tiny_sdxl`: seeded, randomly initialised models of each family (dreambench.models.families)
small enough for CPU tests and smoke runs.

Each is saved once in the diffusers folder format (safetensors) and then loaded through the same
`from_pretrained` code as `model=sd15` / `model=sdxl`, so tests exercise the real loading path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from dreambench.models.tokenizer import build_tiny_tokenizer

TINY_VERSION = 7  # bump when the architecture or construction changes: the folder name carries it
TINY_SDXL_VERSION = 1  # the same for model=tiny_sdxl (conf/model/tiny_sdxl.yaml)
TINY_SD3_VERSION = 1  # and model=tiny_sd3 (conf/model/tiny_sd3.yaml)
TINY_FLUX_VERSION = 1  # and model=tiny_flux (conf/model/tiny_flux.yaml)
VERSIONS = {"sd": TINY_VERSION, "sdxl": TINY_SDXL_VERSION, "sd3": TINY_SD3_VERSION, "flux": TINY_FLUX_VERSION}
FLUX_SCALING_FACTOR, FLUX_SHIFT_FACTOR = 0.3611, 0.1159  # FLUX.1's VAE config
SDXL_SCALING_FACTOR = 0.13025
SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR = 1.5305, 0.0609  # SD 3.5's VAE config
SD_SCALING_FACTOR = 0.18215
RESOLUTION = 32  # px; the VAE downsamples 2x, so latents are 4 x 16 x 16


def _synthetic_images(n: int, size: int, seed: int) -> torch.Tensor:
    # Flat backgrounds with a coloured disc or square: what a tiny subject photo looks like. [-1, 1], NCHW.
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        bg, fg = rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3)
        cx, cy, r = rng.uniform(0.3, 0.7, 2).tolist() + [rng.uniform(0.15, 0.3)]
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) if i % 2 else (abs(xx - cx) < r) & (abs(yy - cy) < r)
        out[i] = np.where(mask[None], fg[:, None, None], bg[:, None, None])
    return torch.from_numpy(out)


def _fit_autoencoder(vae: AutoencoderKL, steps: int, seed: int) -> None:
    """~70 s (one CPU thread) of Adam with a one-cycle schedule on synthetic images, so the decoder decodes
    what it is given. A random decoder turns every latent into the same coloured noise; a half-fitted one (v6:
    400 steps at a flat 1e-3, MSE ~0.07) decodes the zero latent almost as well as the true one, so neither
    sample grids nor tests could tell a learned subject, or a latent of the wrong scale, from a blank. This fit
    reconstructs the learning test's disc-on-slate photo to MSE ~0.012; its latent x 0.18 or x 5.5, or the zero
    latent, decodes to ~0.074 / ~0.12 / ~0.12."""
    opt = torch.optim.Adam(vae.parameters())  # the schedule sets every step's lr, peaking at 2e-3
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    for i in range(steps):
        x = _synthetic_images(8, RESOLUTION, seed + 1 + i)
        loss = torch.nn.functional.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def sd15_scheduler() -> PNDMScheduler:
    """SD's own noise schedule (scaled_linear 0.00085..0.012 over 1000 steps), epsilon prediction, and the
    scheduler class SD 1.5 ships with (model=tiny, model=toy)."""
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False, prediction_type="epsilon")
    scheduler.register_to_config(clip_sample=False)  # as SD 1.5's config: DDIM must not clip latents to [-1, 1]
    return scheduler


@torch.no_grad()
def give_sd_latent_scale(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Make a fitted VAE behave like SD's where tests can see it (model=tiny, model=toy); the factor k applied.

    A trained VAE's posterior is nearly deterministic (SD's std is ~1e-3 of the latent scale); a random one
    has std ~1, which would bury the subject under sampling noise: log-variance := -12 (std 0.0025).
    SD's VAE latents have std ~5.5, hence its scaling factor 0.18215. An exact reparametrisation (encoder mean
    x k, decoder input / k, k from `images`' latents) gives this VAE the same latent scale, so a forgotten or
    doubled scaling factor is the same 5.5x error here as on SD, and tests can catch it."""
    c = vae.config.latent_channels
    vae.quant_conv.weight[c:] = 0.0
    vae.quant_conv.bias[c:] = -12.0
    std = vae.encode(images).latent_dist.mean.std().item()
    k = (1 / SD_SCALING_FACTOR) / std
    vae.quant_conv.weight[:c] *= k
    vae.quant_conv.bias[:c] *= k
    vae.post_quant_conv.weight /= k
    vae.register_to_config(scaling_factor=SD_SCALING_FACTOR)
    return k


def build_tiny_pipeline(seed: int = 0, vae_steps: int = 800) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=RESOLUTION,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = sd15_scheduler()
    _fit_autoencoder(vae, vae_steps, seed)
    vae.eval()
    give_sd_latent_scale(vae, _synthetic_images(64, RESOLUTION, seed))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def family_scheduler(family: str):
    """The scheduler each family ships with (its scheduler_config.json in the released models): SDXL's Euler
    (scaled-linear betas, epsilon), SD 3.5's rectified flow with shift 3.0, FLUX.1-dev's with the
    resolution-dependent (dynamic) shift."""
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
    if family == "sdxl":
        return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                      prediction_type="epsilon", interpolation_type="linear")
    if family == "sd3":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    if family == "flux":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                               base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                               max_image_seq_len=4096)
    raise ValueError(f"no scheduler for family {family!r}")


def tiny_clip_kwargs(tokenizer) -> dict:
    """model=tiny's CLIP text-encoder size (2 layers, width 32, projection 32), for the other families' tiny ones."""
    return {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": tokenizer.model_max_length, "projection_dim": 32,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def tiny_sd_folder_beside(folder: Path) -> Path:
    """model=tiny's folder in the same cache (conf/model/tiny.yaml names it so)."""
    return folder.parent / f"tiny-sd-v{TINY_VERSION}"


@torch.no_grad()
def build_tiny_sdxl_pipeline(seed: int, vae_from: Path):
    """SDXL's parts at model=tiny's size: two CLIP text encoders (the second with a projection: its pooled
    `text_embeds`), a UNet with SDXL's `text_time` additional embedding (6 time ids x 8 + 32 pooled = 80 inputs),
    cross-attention over both encoders' hidden states (32 + 32), linear projections in the transformer blocks,
    two transformer layers in the inner block (SDXL: 1, 2, 10), and SDXL's Euler scheduler. The VAE is
    model=tiny's fitted one (`vae_from`), reparametrised exactly to SDXL's latent scale 0.13025 and marked
    `force_upcast` as SDXL's is: its scaled latents have unit std as SDXL's do."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    te_kw = tiny_clip_kwargs(tokenizer)
    text_encoder = CLIPTextModel(CLIPTextConfig(**te_kw))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**te_kw))
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=16,
    )
    vae = AutoencoderKL.from_pretrained(vae_from, subfolder="vae", use_safetensors=True)
    k = SD_SCALING_FACTOR / SDXL_SCALING_FACTOR  # latents x k before scaling: the same scaled latents' std
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= k
    vae.quant_conv.bias[:c] *= k
    vae.post_quant_conv.weight /= k
    vae.register_to_config(scaling_factor=SDXL_SCALING_FACTOR, force_upcast=True)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=family_scheduler("sdxl"))


@torch.no_grad()
def build_tiny_sd3_pipeline(seed: int, vae_from: Path, t5: bool = False):
    """SD 3.5's parts at model=tiny's size: an MMDiT (SD3Transformer2DModel: 2 joint blocks, patch 2, 4 heads of
    8, pooled width 32 + 32, joint width 64), two CLIP text encoders with projections (CLIP-L / CLIP-G's roles), no
    T5 by default (model.t5 has nothing to load: zeros in its place, as the pipeline without text_encoder_3;
    `t5=True` adds a 1-layer T5 encoder of width 64 and the project's own T5 tokenizer), the
    rectified-flow scheduler with SD3's shift 3.0. The VAE is model=tiny's fitted one, reparametrised exactly to
    SD 3.5's latent convention (z - shift) x scale with its shift 0.0609 and scale 1.5305: encoder mean rows
    x k + shift, decoder input (z - shift) / k, k = 0.18215 / 1.5305, so its scaled latents have unit std."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    te_kw = tiny_clip_kwargs(tokenizer)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**te_kw))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**te_kw))
    transformer = SD3Transformer2DModel(sample_size=RESOLUTION // 2, patch_size=2, in_channels=4, out_channels=4,
                                        num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                                        pos_embed_max_size=16)
    vae = shifted_vae(vae_from, SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR)
    scheduler = family_scheduler("sd3")
    text_encoder_3 = tokenizer_3 = None
    if t5:
        from transformers import T5Config, T5EncoderModel

        from dreambench.models.tokenizer import build_tiny_t5_tokenizer
        tokenizer_3 = build_tiny_t5_tokenizer()
        text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=64, d_kv=8, d_ff=64,
                                                 num_layers=1, num_heads=4, pad_token_id=0, eos_token_id=1,
                                                 decoder_start_token_id=0))
    return StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                                    text_encoder_2=text_encoder_2, text_encoder_3=text_encoder_3,
                                    tokenizer=tokenizer, tokenizer_2=tokenizer, tokenizer_3=tokenizer_3)


@torch.no_grad()
def shifted_vae(vae_from: Path, scale: float, shift: float) -> AutoencoderKL:
    """model=tiny's fitted VAE reparametrised exactly to a (z - shift) x scale latent convention (SD 3.5, Flux):
    encoder mean rows x k + shift, decoder input (z - shift) / k, k = 0.18215 / scale, so the scaled latents keep
    unit std."""
    vae = AutoencoderKL.from_pretrained(vae_from, subfolder="vae", use_safetensors=True)
    k = SD_SCALING_FACTOR / scale
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= k
    vae.quant_conv.bias[:c] = vae.quant_conv.bias[:c] * k + shift
    w = vae.post_quant_conv.weight  # [c, c, 1, 1]: z = (z' - shift) / k
    vae.post_quant_conv.bias -= (w[:, :, 0, 0].sum(dim=1) * shift / k)
    vae.post_quant_conv.weight /= k
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    return vae


@torch.no_grad()
def build_tiny_flux_pipeline(seed: int, vae_from: Path):
    """FLUX.1-dev's parts at model=tiny's size: a FluxTransformer2DModel (1 double- and 1 single-stream block, 2
    heads of 16, rotary axes 4 + 4 + 8, a guidance embedding, 16 input channels = 4 latent channels packed 2 x 2),
    CLIP-L's role (its pooled output, width 32) and a 1-layer T5 (width 32) with the project's own T5 tokenizer,
    Flux's scheduler (dynamic, resolution-dependent shift) and latent convention (z - 0.1159) x 0.3611 on
    model=tiny's fitted VAE."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from dreambench.models.tokenizer import build_tiny_t5_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_clip_kwargs(tokenizer)))
    tokenizer_2 = build_tiny_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                             num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    vae = shifted_vae(vae_from, FLUX_SCALING_FACTOR, FLUX_SHIFT_FACTOR)
    return FluxPipeline(transformer=transformer, vae=vae, scheduler=family_scheduler("flux"), text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


def is_built(folder: Path, family: str = "sd") -> bool:
    marker = folder / "tiny.json"
    if not marker.is_file():
        return False
    info = json.loads(marker.read_text())
    return info.get("family", "sd") == family and info.get("version") == VERSIONS[family]


def ensure_tiny_model(folder: str | Path, seed: int = 0, family: str = "sd") -> Path:
    """Build the tiny model into `folder` unless a complete one is there; returns the folder. Safe when
    several processes (test workers, DDP ranks) build at once: the first rename wins, the rest discard."""
    from dreambench.utils.io import safe_rmtree

    folder = Path(folder).expanduser()
    if family not in VERSIONS:
        raise ValueError(f"no tiny model of family {family!r} (have: {', '.join(VERSIONS)})")
    if is_built(folder, family):
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    # One intra-op thread: the autoencoder fit sums in a thread-count-dependent order, and 800 Adam steps
    # amplify that into a visibly different model; with one thread the build is the same on every run.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if family != "sd":  # model=tiny's fitted VAE, from its folder beside this one (built there if missing)
            build = {"sdxl": build_tiny_sdxl_pipeline, "sd3": build_tiny_sd3_pipeline,
                     "flux": build_tiny_flux_pipeline}[family]
            pipe = build(seed, ensure_tiny_model(tiny_sd_folder_beside(folder), seed))
        else:
            pipe = build_tiny_pipeline(seed)
    finally:
        torch.set_num_threads(threads)
    pipe.save_pretrained(tmp, safe_serialization=True)
    marker = {"version": VERSIONS[family], "seed": seed, **({"family": family} if family != "sd" else {})}
    (tmp / "tiny.json").write_text(json.dumps(marker))
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists() and not is_built(folder, family):  # a partial build of this very version: ours to replace
        safe_rmtree(folder, folder.parent)
    try:
        os.replace(tmp, folder)  # fails on a non-empty folder: another process finished first
    except OSError:
        if not is_built(folder, family):
            raise
        safe_rmtree(tmp, folder.parent)
    return folder
