"""FLUX.1 (Black Forest Labs, 2024; dev and schnell): a rectified-flow transformer (FluxTransformer2DModel: double-
then single-stream blocks) on 2x2-packed latents with rotary position ids for image tokens (`img_ids`) and text tokens
(`txt_ids`, zeros), conditioned on T5's hidden states and CLIP-L's *pooled* output only, and (dev) on a guidance
embedding: the distilled guidance scale, a constant during training (`model.flow.guidance`, 3.5 as diffusers'
examples/dreambooth/train_dreambooth_flux.py; schnell has no guidance embedding). Conditioning as diffusers'
`FluxPipeline.encode_prompt`; packing, ids and unpacking as `FluxPipeline._pack_latents` /
`_prepare_latent_image_ids` / `_unpack_latents`, inside `denoise`, so the module's loss works on [B, C, H, W] latents
like every other family. Training σ gets the resolution-dependent shift the pipeline samples with
(`use_dynamic_shifting`: μ from the packed image's sequence length, `calculate_shift`, exponential time shift)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dreambench.models.families.base import Cond, FlowMatchingFamily
from dreambench.models.families.sd3 import CLIP_LEN, stack_token_rows


class Flux(FlowMatchingFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2")  # CLIP-L (pooled), T5
    tokenizers = ("tokenizer", "tokenizer_2")
    trainable_text_encoders = ("text_encoder",)  # CLIP only; T5 is never trained (train_dreambooth_flux.py)
    max_sequence_length = 512  # FluxPipeline's default for dev
    guidance = 3.5  # model.flow.guidance: the guidance embedding's value in training (dev)

    def configured(self, model_cfg, unet):
        from dreambench.schema import FlowSchema
        fam = super().configured(model_cfg, unet)
        fam.guidance = float((model_cfg.get("flow") or {}).get("guidance", FlowSchema.guidance))
        return fam

    def load_parts(self, ref, revision, variant, use_safetensors, options=None):
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast
        kw = {"revision": revision, "use_safetensors": use_safetensors}
        return {"tokenizer": CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer", revision=revision),
                "tokenizer_2": T5TokenizerFast.from_pretrained(ref, subfolder="tokenizer_2", revision=revision),
                "text_encoder": CLIPTextModel.from_pretrained(ref, subfolder="text_encoder", variant=variant, **kw),
                "text_encoder_2": T5EncoderModel.from_pretrained(ref, subfolder="text_encoder_2", variant=variant,
                                                                 **kw),
                "vae": AutoencoderKL.from_pretrained(ref, subfolder="vae", variant=variant, **kw),
                "unet": FluxTransformer2DModel.from_pretrained(ref, subfolder="transformer", variant=variant, **kw)}

    def tokenize(self, tokenizers: Sequence[Any], prompts: Sequence[str]) -> torch.Tensor:
        clip, t5 = tokenizers
        rows = [clip(list(prompts), padding="max_length", max_length=CLIP_LEN, truncation=True,
                     return_tensors="pt").input_ids,
                t5(list(prompts), padding="max_length", max_length=self.max_sequence_length, truncation=True,
                   return_tensors="pt").input_ids]
        return stack_token_rows(rows, [clip.pad_token_id, t5.pad_token_id])

    def encode(self, text_encoders, ids: torch.Tensor) -> Cond:
        clip, t5 = text_encoders
        pooled = clip(ids[:, 0, :CLIP_LEN], output_hidden_states=False).pooler_output
        return {"encoder_hidden_states": t5(ids[:, 1, :self.max_sequence_length])[0], "pooled_projections": pooled}

    def shift_sigmas(self, sigmas: torch.Tensor, latent_shape: Sequence[int], config: dict[str, Any]) -> torch.Tensor:
        """The resolution-dependent shift: exp(μ) / (exp(μ) + 1/σ - 1), μ linear in the packed sequence length."""
        if not config.get("use_dynamic_shifting"):
            return sigmas
        import math

        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        seq_len = (int(latent_shape[-2]) // 2) * (int(latent_shape[-1]) // 2)
        mu = calculate_shift(seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))

    def denoise(self, unet, noisy, t, cond: Cond) -> torch.Tensor:
        from diffusers import FluxPipeline
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        hidden = cond["encoder_hidden_states"]
        txt_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = (torch.full((b,), self.guidance, device=noisy.device, dtype=torch.float32)
                    if unet.config.guidance_embeds else None)
        out = unet(hidden_states=packed, timestep=t / 1000, guidance=guidance,
                   pooled_projections=cond["pooled_projections"], encoder_hidden_states=hidden, txt_ids=txt_ids,
                   img_ids=img_ids, return_dict=False)[0]
        # _unpack_latents takes pixel sizes and the VAE factor; with factor 1 the latent sizes are given directly.
        return FluxPipeline._unpack_latents(out, h, w, 1)

