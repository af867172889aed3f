"""The reference loop: the training step of diffusers' examples/dreambooth/train_dreambooth.py, written out in
plain PyTorch + diffusers (no Accelerate, no Lightning), on the same components, images and settings as a
dreambench run, so `make bench` can put the two side by side.

What the example does every step, and so does this loop (`encode_every_step=True`, "as used"):
  VAE-encode the [instance; class] pixel batch and sample the latent distribution (x scaling_factor);
  encode the two prompts with the frozen text encoder; noise, timesteps, `add_noise`; one UNet forward on the
  concatenated batch; `torch.chunk` the prediction and the target in two; MSE + λ·prior MSE in fp32;
  backward; clip the gradient norm to 1.0; AdamW step; LR-scheduler step; `zero_grad(set_to_none=True)`;
  and `loss.detach().item()` for its progress bar and logs (a host-device sync every step).
Under mixed precision the example keeps the trained UNet in fp32 and casts the frozen VAE and text encoder to
the half dtype (its `weight_dtype`); the forward runs under autocast.

`encode_every_step=False` ("equal work") draws latents from the same cached latent distributions and uses
the same cached prompt embeddings as dreambench, so the only difference left is the framework around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from dreambench.data.images import load_image
from dreambench.data.latents import LatentBank, encode_latent_dist, latent_scale, preprocess


def reference_loss(unet, noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   cond: torch.Tensor, prior_weight: float) -> torch.Tensor:
    """The example's loss on a [instance; class] batch (prior preservation on), written as it writes it."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    model_pred = unet(noisy, timesteps, cond, return_dict=False)[0]
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:  # v_prediction
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
    target, target_prior = torch.chunk(target, 2, dim=0)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
    return loss + prior_weight * prior_loss


def load_pixels(paths: Sequence[Path], resolution: int) -> torch.Tensor:
    # The same decoding and centre crop as dreambench (the example's transforms: resize + centre crop).
    return torch.stack([preprocess(load_image(p), resolution, True) for p in paths])


class ReferenceLoop:
    def __init__(self, components, instance_paths: Sequence[Path], class_paths: Sequence[Path], *,
                 instance_prompt: str, class_prompt: str, resolution: int, lr: float, prior_weight: float = 1.0,
                 betas=(0.9, 0.999), weight_decay: float = 1e-2, eps: float = 1e-8, fused: bool | None = None,
                 device: str | torch.device = "cpu", precision: str = "32-true", encode_every_step: bool = True,
                 seed: int = 0, channels_last: bool = False):
        c = components
        self.device = torch.device(device)
        self.unet, self.vae, self.text_encoder = c.unet, c.vae, c.text_encoder
        self.noise_scheduler = c.noise_scheduler
        self.prior_weight = float(prior_weight)
        self.encode_every_step = encode_every_step
        self.half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
        frozen_dtype = self.half if (self.half is not None and self.device.type == "cuda") else torch.float32
        self.vae.requires_grad_(False).to(self.device, frozen_dtype)
        self.text_encoder.requires_grad_(False).to(self.device, frozen_dtype)
        self.unet.requires_grad_(True).train().to(self.device)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        tok = c.tokenizer

        def ids(prompt):
            return tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
        self.input_ids = torch.cat([ids(instance_prompt), ids(class_prompt)]).to(self.device)
        self.instance_pixels = load_pixels(instance_paths, resolution)
        self.class_pixels = load_pixels(class_paths, resolution)
        if not encode_every_step:
            with torch.no_grad():
                self.instance_bank = LatentBank(*encode_latent_dist(self.vae, self.instance_pixels))
                self.class_bank = LatentBank(*encode_latent_dist(self.vae, self.class_pixels))
                self.cond = self.text_encoder(self.input_ids)[0].float()
        kw = {} if fused is None else {"fused": bool(fused)}
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                           eps=eps, **kw)
        from diffusers.optimization import get_scheduler
        self.lr_scheduler = get_scheduler("constant", self.optimizer)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.step_count = 0
        self.last_loss: float | None = None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.half, enabled=self.half is not None)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        i, j = step % len(self.instance_pixels), step % len(self.class_pixels)
        g = self.generator
        if self.encode_every_step:
            pixels = torch.cat([self.instance_pixels[i:i + 1], self.class_pixels[j:j + 1]])
            pixels = pixels.to(self.device, next(self.vae.parameters()).dtype)
            with torch.no_grad():
                dist = self.vae.encode(pixels).latent_dist
                latents = dist.sample(generator=g) * latent_scale(self.vae)
                cond = self.text_encoder(self.input_ids)[0]
            return latents.float(), cond
        idx = torch.tensor([i])
        latents = torch.cat([self.instance_bank.sample(idx, g), self.class_bank.sample(torch.tensor([j]), g)])
        return latents, self.cond

    def step(self) -> None:
        g = self.generator
        with self.autocast():
            latents, cond = self.batch(self.step_count)
            noise = torch.randn(latents.shape, generator=g, device=latents.device, dtype=latents.dtype)
            t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g,
                              device=latents.device)
            loss = reference_loss(self.unet, self.noise_scheduler, latents, noise, t, cond, self.prior_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss.detach().item()  # the example's per-step logs / progress bar
        self.step_count += 1
