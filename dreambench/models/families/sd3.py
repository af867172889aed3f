"""Stable Diffusion 3 / 3.5 (Esser et al. 2024, "Scaling Rectified Flow Transformers"): an MMDiT transformer,
rectified-flow training, and three text encoders — CLIP-L and CLIP-G (penultimate hidden states concatenated on the
feature axis and zero-padded to T5's width; pooled outputs concatenated, 768 + 1280 = 2048 `pooled_projections`)
and T5-XXL (appended along the sequence axis, `model.max_sequence_length` tokens; `model.t5=false` leaves it out and
puts zeros in its place, as StableDiffusion3Pipeline does without `text_encoder_3`). Conditioning as diffusers'
`StableDiffusion3Pipeline.encode_prompt` computes it; the objective is `flow_matching` (dreambench.losses, conf
`model.flow`): x_t = (1 - σ) x0 + σ ε, target ε - x0, σ from the scheduler's shifted schedule at a timestep index
drawn by `flow.timestep_sampling`, loss weighted by `flow.loss_weighting` — as examples/dreambooth/
train_dreambooth_sd3.py (without its EDM-style output preconditioning)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dreambench.models.families.base import Cond, FlowMatchingFamily

CLIP_LEN = 77


def stack_token_rows(rows: list[torch.Tensor], pads: list[int]) -> torch.Tensor:
    """Token ids of several tokenizers ([B, L_k] each) as one tensor [B, n, max L_k], each row padded with its own
    pad id (encode slices each back to its length): one tensor, so caption dropout, batching and the validation set
    treat every family's ids alike."""
    n = max(r.shape[-1] for r in rows)
    return torch.stack([F.pad(r, (0, n - r.shape[-1]), value=p) for r, p in zip(rows, pads)], dim=1)


class SD3(FlowMatchingFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")  # the CLIP encoders; T5 is never trained
    max_sequence_length = 256  # T5 tokens (StableDiffusion3Pipeline's default)
    joint_attention_dim: int | None = None  # the transformer's text width (T5's zeros when model.t5=false)

    def configured(self, model_cfg, unet):
        fam = super().configured(model_cfg, unet)
        fam.joint_attention_dim = int(unet.config.joint_attention_dim)
        return fam

    def load_parts(self, ref, revision, variant, use_safetensors, options=None):
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer
        kw = {"revision": revision, "use_safetensors": use_safetensors}
        parts: dict[str, Any] = {
            "tokenizer": CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer", revision=revision),
            "tokenizer_2": CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer_2", revision=revision),
            "text_encoder": CLIPTextModelWithProjection.from_pretrained(ref, subfolder="text_encoder",
                                                                        variant=variant, **kw),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(ref, subfolder="text_encoder_2",
                                                                          variant=variant, **kw),
            "vae": AutoencoderKL.from_pretrained(ref, subfolder="vae", variant=variant, **kw),
            "unet": SD3Transformer2DModel.from_pretrained(ref, subfolder="transformer", variant=variant, **kw),
            "text_encoder_3": None, "tokenizer_3": None,
        }
        if (options or {}).get("t5", True) and _has_subfolder(ref, "text_encoder_3", revision):
            from transformers import T5EncoderModel, T5TokenizerFast
            parts["tokenizer_3"] = T5TokenizerFast.from_pretrained(ref, subfolder="tokenizer_3", revision=revision)
            parts["text_encoder_3"] = T5EncoderModel.from_pretrained(ref, subfolder="text_encoder_3",
                                                                     variant=variant, **kw)
        return parts

    def load_pipeline(self, ref: str, **kw: Any):
        import diffusers
        if not _has_subfolder(ref, "text_encoder_3", kw.get("revision")):
            # A folder saved without T5 (model.t5=false, the tiny SD3): diffusers wants the absence said.
            kw = {"text_encoder_3": None, "tokenizer_3": None, **kw}
        return diffusers.StableDiffusion3Pipeline.from_pretrained(ref, use_safetensors=True, **kw)

    # ---- prompts: CLIP ids [B, 2, 77] and, with T5, its ids as a third row (each row padded to the longer) ------
    def tokenize(self, tokenizers: Sequence[Any], prompts: Sequence[str]) -> torch.Tensor:
        max_sequence_length = self.max_sequence_length
        rows = [tok(list(prompts), padding="max_length", max_length=CLIP_LEN, truncation=True,
                    return_tensors="pt").input_ids for tok in tokenizers[:2]]
        t5 = tokenizers[2] if len(tokenizers) > 2 else None
        if t5 is not None:
            rows.append(t5(list(prompts), padding="max_length", max_length=max_sequence_length, truncation=True,
                           add_special_tokens=True, return_tensors="pt").input_ids)
        return stack_token_rows(rows, [tokenizers[k].pad_token_id for k in range(len(rows))])

    def encode(self, text_encoders, ids: torch.Tensor) -> Cond:
        max_sequence_length, joint_attention_dim = self.max_sequence_length, self.joint_attention_dim
        hidden, pooled = [], []
        for k in range(2):
            out = text_encoders[k](ids[:, k, :CLIP_LEN], output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(hidden, dim=-1)
        t5_encoder = text_encoders[2] if len(text_encoders) > 2 else None
        if t5_encoder is not None:
            t5 = t5_encoder(ids[:, 2, :max_sequence_length])[0]
        else:  # model.t5=false: zeros in T5's place, as the pipeline without text_encoder_3
            t5 = clip.new_zeros(clip.shape[0], max_sequence_length, int(joint_attention_dim or clip.shape[-1]))
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, -1)}

    def denoise(self, unet, noisy, t, cond: Cond) -> torch.Tensor:
        return unet(hidden_states=noisy, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                    pooled_projections=cond["pooled_projections"], return_dict=False)[0]


def _has_subfolder(ref: str, sub: str, revision: str | None) -> bool:
    from pathlib import Path

    from dreambench.models.loading import _looks_local, reachable
    if _looks_local(ref):
        return (Path(ref).expanduser() / sub / "config.json").is_file()
    return reachable(ref, f"{sub}/config.json") is None
