"""SDXL (Podell et al. 2023): two CLIP text encoders, whose penultimate hidden states are concatenated along the
feature axis (768 + 1280 = 2048 for SDXL base) and the second one's pooled, projected output (`text_embeds`); and
"micro-conditioning" on each image's original size, crop corner and target size (`time_ids`, §2.2), as diffusers'
`StableDiffusionXLPipeline.encode_prompt` / `_get_add_time_ids` and examples/dreambooth/
train_dreambooth_lora_sdxl.py compute them. Everything is batched along dim 0, so an [instance; class] batch is
one forward pass with each half's own pooled embeddings and time ids (the bug of diffusers #7239 / #7242, and of
an extension that concatenated the prior batch along the channel axis, cannot happen here: a test checks it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dreambench.models.families.base import Cond, Family


class SDXL(Family):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    methods = ("dreambooth", "lora", "textual_inversion")  # TI: a row in both encoders (clip_l, clip_g)
    needs_image_geometry = True

    def load_parts(self, ref, revision, variant, use_safetensors, options=None):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
        kw = {"revision": revision, "use_safetensors": use_safetensors}
        return {"tokenizer": CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer", revision=revision),
                "tokenizer_2": CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer_2", revision=revision),
                "text_encoder": CLIPTextModel.from_pretrained(ref, subfolder="text_encoder", variant=variant, **kw),
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(ref, subfolder="text_encoder_2",
                                                                              variant=variant, **kw),
                "vae": AutoencoderKL.from_pretrained(ref, subfolder="vae", variant=variant, **kw),
                "unet": UNet2DConditionModel.from_pretrained(ref, subfolder="unet", variant=variant, **kw)}

    def tokenize(self, tokenizers: Sequence[Any], prompts: Sequence[str]) -> torch.Tensor:
        ids = [tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids for tok in tokenizers]
        if ids[0].shape != ids[1].shape:
            raise ValueError(f"SDXL tokenizers pad to different lengths {ids[0].shape[-1]} / {ids[1].shape[-1]}")
        return torch.stack(ids, dim=1)  # [B, 2, L]

    def encode(self, text_encoders, ids: torch.Tensor) -> Cond:
        hidden = []
        pooled = None
        for k, te in enumerate(text_encoders):
            out = te(ids[:, k], output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # the penultimate layer, as SDXL was trained
            if k == len(text_encoders) - 1:
                pooled = out.text_embeds  # the second encoder's projected pooled output
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def add_image_conditioning(self, cond: Cond, geometry: torch.Tensor | None) -> Cond:
        if geometry is None:
            raise ValueError("SDXL needs each image's size and crop (time_ids)")
        dtype = cond["encoder_hidden_states"].dtype
        return {**cond, "time_ids": geometry.to(cond["encoder_hidden_states"].device, dtype)}

    def denoise(self, unet, noisy, t, cond: Cond) -> torch.Tensor:
        return unet(noisy, t, cond["encoder_hidden_states"],
                    added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}).sample
