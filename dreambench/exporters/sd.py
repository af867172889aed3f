"""Stable Diffusion 1.x / 2.x: diffusers weights -> one state dict in the original (CompVis LDM) key layout, the
layout of the `.safetensors` checkpoints ComfyUI, AUTOMATIC1111/Forge and InvokeAI load, and that
`StableDiffusionPipeline.from_single_file` reads back.

diffusers ships this direction only as a script (scripts/convert_diffusers_to_original_stable_diffusion.py), not
in the library, and the script hard-codes SD's block counts. This is the inverse of the library's own reader
(`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`), written from the model's config so the tiny
model's (2 blocks, 1 layer each) and SD's (4 blocks, 2 layers) layouts come from the same code. Every diffusers
weight must land on exactly one original key, or the conversion raises: a weight silently dropped would load
back as a freshly initialised layer in another tool.
"""

from __future__ import annotations

import re
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP ViT-L, transformers' own key names
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H, open_clip's key names
NAME = "sd"  # SD 1.x / 2.x
PIPELINES = ("StableDiffusionPipeline",)

# Inside a UNet ResBlock, diffusers name -> LDM name (the LDM block is a Sequential: in_layers = norm, SiLU, conv).
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def _split(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _rename(mapping: dict[str, str], name: str) -> str:
    for old, new in mapping.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return name


def unet_key(key: str, cfg: dict[str, Any]) -> str:
    """One diffusers UNet2DConditionModel key -> its LDM key. The LDM UNet numbers its input blocks 1.. (0 is
    conv_in) with `layers_per_block` res(+attention) layers and one downsampler per level but the last, and its
    output blocks 0.. with one more layer per level (the skip connections)."""
    n = int(cfg["layers_per_block"])
    module, param = _split(key)
    if (m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\..+)?", module)):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), (m[4] or "")[1:]
        i = 1 + b * (n + 1) + j
        out = f"input_blocks.{i}.0.{_rename(_UNET_RESNET, rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
    elif (m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module)):
        out = f"input_blocks.{1 + int(m[1]) * (n + 1) + n}.0.op"
    elif (m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)(\..+)?", module)):
        kind, j, rest = m[1], int(m[2]), (m[3] or "")[1:]
        # middle_block = ResBlock, SpatialTransformer, ResBlock
        out = f"middle_block.{2 * j}.{_rename(_UNET_RESNET, rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    elif (m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\..+)?", module)):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), (m[4] or "")[1:]
        i = b * (n + 1) + j
        out = f"output_blocks.{i}.0.{_rename(_UNET_RESNET, rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
    elif (m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module)):
        b = int(m[1])
        # The upsampler follows the last layer: slot 1 of that layer, or 2 where the layer also has attention.
        slot = 2 if "CrossAttn" in cfg["up_block_types"][b] else 1
        out = f"output_blocks.{b * (n + 1) + n}.{slot}.conv"
    elif module in _UNET_FIXED:
        out = _UNET_FIXED[module]
    else:
        raise KeyError(f"UNet weight {key!r} has no place in the original SD layout")
    return f"{UNET_PREFIX}{out.rstrip('.')}.{param}"


def vae_key(key: str, cfg: dict[str, Any]) -> str:
    """One diffusers AutoencoderKL key -> its LDM key. LDM numbers the decoder's levels from the bottom
    (up.{levels-1} runs first), diffusers in the order they run."""
    levels = len(cfg["up_block_types"])
    module, param = _split(key)
    if (m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)(\..+)", module)):
        out = f"encoder.down.{m[1]}.block.{m[2]}{m[3]}"
    elif (m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", module)):
        out = f"encoder.down.{m[1]}.downsample.conv"
    elif (m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)(\..+)", module)):
        out = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}{m[3]}"
    elif (m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", module)):
        out = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv"
    elif (m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)(\..+)", module)):
        out = f"{m[1]}.mid.block_{int(m[2]) + 1}{m[3]}"
    elif (m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", module)):
        out = f"{m[1]}.mid.attn_1.{_rename(_VAE_ATTN, m[2])}"
    elif (m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out", module)):
        out = f"{m[1]}.norm_out"
    elif re.fullmatch(r"(encoder|decoder)\.conv_(in|out)|(post_)?quant_conv", module):
        out = module
    else:
        raise KeyError(f"VAE weight {key!r} has no place in the original SD layout")
    return f"{VAE_PREFIX}{out.replace('conv_shortcut', 'nin_shortcut')}.{param}"


def _vae_tensor(key: str, t: torch.Tensor) -> torch.Tensor:
    # LDM's VAE attention uses 1x1 convolutions where diffusers uses linear layers.
    return t[:, :, None, None] if ".mid.attn_1." in key and key.endswith(".weight") and t.ndim == 2 else t


def text_encoder_open_clip(sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel -> open_clip's layout (SD 2.x): q, k, v fused into one in_proj. diffusers' SD 2
    text encoder has 23 of OpenCLIP's 24 layers (SD 2 conditions on the penultimate one); the 24th is absent
    from the export, as diffusers' own reader ignores it."""
    out: dict[str, torch.Tensor] = {}
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    for k, v in sd.items():
        if k in fixed:
            out[OPEN_CLIP_PREFIX + fixed[k]] = v
    for i in range(layers):
        src = f"text_model.encoder.layers.{i}."
        dst = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([sd[f"{src}self_attn.{x}_proj.{p}"] for x in "qkv"])
        for k, v in sd.items():
            if k.startswith(src) and not re.search(r"self_attn\.[qkv]_proj\.", k):
                out[dst + _rename(_OPEN_CLIP_LAYER, k[len(src):])] = v
    unused = set(sd) - {k for k in sd if k in fixed or k.startswith("text_model.encoder.layers.")}
    if unused:
        raise KeyError(f"text encoder weight(s) with no place in the open_clip layout: {sorted(unused)}")
    return out


def to_original(pipe: Any) -> dict[str, torch.Tensor]:
    """The whole pipeline as one original-layout state dict (contiguous CPU tensors, the weights' own dtype)."""
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    out: dict[str, torch.Tensor] = {}
    ucfg, vcfg = dict(unet.config), dict(vae.config)
    for k, v in unet.state_dict().items():
        out[unet_key(k, ucfg)] = v
    for k, v in vae.state_dict().items():
        key = vae_key(k, vcfg)
        out[key] = _vae_tensor(key, v)
    if len(out) < len(unet.state_dict()) + len(vae.state_dict()):  # two diffusers weights on one key
        raise KeyError("the conversion mapped distinct UNet/VAE weights onto the same original key")
    # transformers 5's CLIPTextModel has no `text_model.` level (4.x had): the original layout does.
    te = {(k if k.startswith("text_model.") else f"text_model.{k}"): v
          for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}
    # SD 2.x's OpenCLIP text encoder uses plain GELU, SD 1.x's OpenAI CLIP quick-GELU: the layout follows.
    if text_encoder.config.hidden_act == "gelu":
        out.update(text_encoder_open_clip(te, text_encoder.config.num_hidden_layers))
    else:
        out.update({CLIP_PREFIX + k: v for k, v in te.items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}
