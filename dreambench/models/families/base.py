"""The model-family seam: what differs between model generations lives in one `Family` subclass each (`sd.py`:
SD 1.x/2.x, `sdxl.py`: SDXL, `sd3.py`: SD 3.5, `flux.py`: FLUX.1). The LightningModule, the methods, sampling,
export, generate and evaluate talk to a family instead of assuming one UNet + one CLIP text encoder +
`StableDiffusionPipeline`:

- which components a model has and how they load (`parts`, `load_parts`);
- how prompts become the denoiser's conditioning (`tokenize`, `encode`): a `Cond`, a dict of tensors that are
  all batched along dim 0, so that an [instance; class] batch is one `cond_cat` and one forward pass, and
  nothing of one half can leak into the other along another axis;
- what each image adds to the conditioning (`add_image_conditioning`: SDXL's size / crop `time_ids`);
- how the denoiser is called (`denoise`);
- the diffusers pipeline it samples and exports with (`pipeline_class`, `pipeline`);
- how LoRA adapters are saved so that the family's own pipeline loads them (`save_lora`);
- which methods apply (`methods`);
- the training objective (`objective`): "ddpm" (noising by the scheduler's alphas, epsilon or v target; SD, SDXL)
  or "flow_matching" (rectified flow: x_t = (1 - σ) x0 + σ ε, target ε - x0; SD 3.5, Flux), computed by the module
  from `dreambench.losses`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

Cond = dict[str, torch.Tensor]  # the denoiser's conditioning, every tensor batched along dim 0


def cond_cat(conds: Sequence[Cond]) -> Cond:
    """Concatenate along the batch axis, key by key (an [instance; class] batch)."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_take(cond: Cond, index: Any) -> Cond:
    """Rows `index` (a slice or index tensor) of every tensor."""
    return {k: v[index] for k, v in cond.items()}


def cond_where(pick_a: torch.Tensor, a: Cond, b: Cond) -> Cond:
    """Row i from `a` where pick_a[i], else from `b` (caption dropout's empty prompt)."""
    return {k: torch.where(pick_a.view(-1, *[1] * (a[k].ndim - 1)), a[k], b[k]) for k in a}


def cond_float(cond: Cond) -> Cond:
    return {k: v.float() for k, v in cond.items()}


class Family:
    """One generation of models. Stateless: every method takes what it works on."""

    name = "family"
    pipeline_class = "DiffusionPipeline"  # the diffusers class that samples, exports and reloads the model
    text_encoders: tuple[str, ...] = ("text_encoder",)  # attribute / subfolder names, in the pipeline's order
    tokenizers: tuple[str, ...] = ("tokenizer",)
    trainable_text_encoders: tuple[str, ...] = ("text_encoder",)  # what train_text_encoder / LoRA may train
    methods: tuple[str, ...] = ("dreambooth", "lora", "textual_inversion")
    needs_image_geometry = False  # add_image_conditioning reads each image's size and crop
    denoiser = "unet"  # the pipeline's name for the denoiser (the module keeps it as `unet` whatever it is)
    objective = "ddpm"  # "ddpm" | "flow_matching"
    pipeline_init_kwargs: ClassVar[dict[str, Any]] = {}  # extra keywords of the pipeline class (SD's safety checker)

    # ---- loading -----------------------------------------------------------------------------------------------
    def configured(self, model_cfg: Any, unet: Any) -> Family:
        """The family as one run uses it (settings from `model.*` and the loaded denoiser); stateless ones are
        shared."""
        return self

    def shift_sigmas(self, sigmas: torch.Tensor, latent_shape: Sequence[int], config: dict[str, Any]) -> torch.Tensor:
        """Flow-matching families: σ as training uses it at this latent size (Flux: the resolution-dependent
        shift); SD 3.5's shift is already in its scheduler's schedule."""
        return sigmas

    def training_scheduler(self, config: dict[str, Any]):
        """The forward process of training, from the model's scheduler config."""
        from diffusers import DDPMScheduler
        return DDPMScheduler.from_config(config)

    def load_parts(self, ref: str, revision: str | None, variant: str | None, use_safetensors: bool | None,
                   options: dict[str, Any] | None = None) -> dict[str, Any]:
        """{"unet", "vae", text encoders..., tokenizers...} of a local diffusers folder or hub id."""
        raise NotImplementedError

    def load_pipeline(self, ref: str, **kw: Any):
        import diffusers
        cls = getattr(diffusers, self.pipeline_class)
        return cls.from_pretrained(ref, use_safetensors=True, **self.pipeline_init_kwargs, **kw)

    # ---- prompts -----------------------------------------------------------------------------------------------
    def tokenize(self, tokenizers: Sequence[Any], prompts: Sequence[str]) -> torch.Tensor:
        """Token ids: [B, L] with one tokenizer, [B, n, L] with n (each padded to its own max length)."""
        raise NotImplementedError

    def encode(self, text_encoders: Sequence[torch.nn.Module], ids: torch.Tensor) -> Cond:
        raise NotImplementedError

    def add_image_conditioning(self, cond: Cond, geometry: torch.Tensor | None) -> Cond:
        """geometry: [B, 6] (original height, width, crop top, left, target height, width) of each image."""
        return cond

    # ---- the denoiser --------------------------------------------------------------------------------------------
    def denoise(self, unet: torch.nn.Module, noisy: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        raise NotImplementedError

    # ---- sampling and export -------------------------------------------------------------------------------------
    def pipeline(self, parts: dict[str, Any], scheduler: Any):
        """The family's pipeline over components in memory (`parts` by diffusers name; the denoiser under "unet",
        as the module keeps it; a text encoder the model does not have, SD 3.5's T5 left out, is None)."""
        import diffusers
        cls = getattr(diffusers, self.pipeline_class)
        pipe = cls(**{self.denoiser: parts["unet"], "vae": parts["vae"]},
                   **{k: parts.get(k) for k in (*self.text_encoders, *self.tokenizers)},
                   scheduler=scheduler, **self.pipeline_init_kwargs)
        pipe.set_progress_bar_config(disable=True)
        return self.with_call_kwargs(pipe)

    def call_kwargs(self) -> dict[str, Any]:
        """Keywords every sampling call of this run passes to the pipeline (SD3: max_sequence_length, so that
        samples see the conditioning training saw)."""
        return {}

    def with_call_kwargs(self, pipe):
        pipe._dreambench_call_kwargs = self.call_kwargs()  # read by dreambench.sampling.generate
        return pipe

    def save_lora(self, folder: Path, unet_layers: dict, unet_meta: dict, text_layers: dict[str, dict],
                  text_meta: dict[str, dict], weight_name: str) -> None:
        """Adapters in the diffusers LoRA format the family's pipeline `load_lora_weights` reads; `text_layers`
        maps a text encoder's name to its adapter state dict (only the trained ones)."""
        import diffusers
        cls = getattr(diffusers, self.pipeline_class)
        kw: dict[str, Any] = {}
        for name, layers in text_layers.items():
            kw[f"{name}_lora_layers"] = layers
            kw[f"{name}_lora_adapter_metadata"] = text_meta[name]
        kw[f"{self.denoiser}_lora_layers"] = unet_layers  # unet_lora_layers / transformer_lora_layers
        kw[f"{self.denoiser}_lora_adapter_metadata"] = unet_meta
        cls.save_lora_weights(folder, safe_serialization=True, weight_name=weight_name, **kw)

    # ---- what the rest of the code asks -------------------------------------------------------------------------
    def check_method(self, method: str) -> None:
        if method not in self.methods:
            from dreambench.errors import UserError
            raise UserError(f"method={method} does not apply to model.family={self.name} (it has: "
                            f"{', '.join(self.methods)})")

    # Switches written for the DDPM objective (docs/TOOLBOX.md) that a flow-matching family does not have yet.
    DDPM_ONLY = (("loss.min_snr_gamma", "min-SNR weighting is defined on DDPM's SNR; use model.flow.loss_weighting"),
                 ("loss.noise_offset", "not defined for rectified flow here yet"),
                 ("loss.input_perturbation", "not defined for rectified flow here yet"),
                 ("model.zero_terminal_snr", "a DDPM schedule fix; rectified flow reaches pure noise at σ = 1"),
                 ("train.val_loss.every_n_steps", "the validation loss is computed on DDPM timesteps, not yet on σ"),
                 ("data.buckets", "aspect-ratio buckets are not wired to the flow-matching step yet"),
                 ("guidance.guidance_rescale", "the SD 3.5 / Flux pipelines have no guidance rescale"))

    def check_config(self, cfg: Any) -> None:
        """Settings of a run that the family cannot honour: one UserError line before anything loads."""
        if self.objective == "ddpm":
            return
        from omegaconf import OmegaConf

        from dreambench.errors import UserError
        for key, why in self.DDPM_ONLY:
            v = OmegaConf.select(cfg, key)
            if v not in (None, False, 0, 0.0):
                raise UserError(f"{key}={v} does not apply to model.family={self.name} ({self.objective}): {why}")

    def __repr__(self) -> str:
        return f"<family {self.name}>"


class FlowMatchingFamily(Family):
    """What the rectified-flow families (SD 3.5, Flux) share: the flow-matching scheduler as the forward process, T5
    with `model.max_sequence_length` tokens (also passed to every sampling call, so samples see the conditioning
    training saw), and the methods they have."""

    objective = "flow_matching"
    methods = ("dreambooth", "lora")
    max_sequence_length = 256  # T5 tokens; the subclass's default when model.max_sequence_length is null

    def configured(self, model_cfg: Any, unet: Any) -> Family:
        import copy
        fam = copy.copy(self)
        fam.max_sequence_length = int(model_cfg.get("max_sequence_length") or self.max_sequence_length)
        return fam

    def training_scheduler(self, config: dict[str, Any]):
        from diffusers import FlowMatchEulerDiscreteScheduler
        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def call_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}
