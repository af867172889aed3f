"""SD 1.x / 2.x: one CLIP text encoder (its last hidden states), a UNet with cross-attention, epsilon or v target."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from dreambench.models.families.base import Cond, Family


class SD(Family):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    pipeline_init_kwargs: ClassVar[dict[str, Any]] = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def load_parts(self, ref, revision, variant, use_safetensors, options=None):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
        kw = {"revision": revision, "use_safetensors": use_safetensors}
        return {"tokenizer": CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer", revision=revision),
                "text_encoder": CLIPTextModel.from_pretrained(ref, subfolder="text_encoder", variant=variant, **kw),
                "vae": AutoencoderKL.from_pretrained(ref, subfolder="vae", variant=variant, **kw),
                "unet": UNet2DConditionModel.from_pretrained(ref, subfolder="unet", variant=variant, **kw)}

    def load_pipeline(self, ref: str, **kw: Any):
        import diffusers
        return diffusers.StableDiffusionPipeline.from_pretrained(
            ref, use_safetensors=True, safety_checker=None, requires_safety_checker=False, **kw)

    def tokenize(self, tokenizers: Sequence[Any], prompts: Sequence[str]) -> torch.Tensor:
        tok = tokenizers[0]
        return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    def encode(self, text_encoders, ids: torch.Tensor) -> Cond:
        return {"encoder_hidden_states": text_encoders[0](ids)[0]}

    def denoise(self, unet, noisy, t, cond: Cond) -> torch.Tensor:
        return unet(noisy, t, cond["encoder_hidden_states"]).sample
