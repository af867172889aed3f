"""Diffusion maths as small pure tensor functions; the LightningModule only wires them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_target(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """What the UNet regresses: epsilon, or v = sqrt(a_t) * eps - sqrt(1 - a_t) * x0 (Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alphas_cumprod.to(latents.device, torch.float32)[timesteps].view(-1, *[1] * (latents.ndim - 1))
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()).to(noise.dtype)
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")


def prior_preservation_loss(pred: torch.Tensor, target: torch.Tensor, num_instance: int,
                            prior_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paper §3.3, eq. 2: the batch is [instance; class] in one forward pass;
    L = E||x̂(inst) - x(inst)||² + λ E||x̂(class) - x(class)||². Returns (loss, instance part, prior part).
    Computed in fp32 whatever the autocast dtype of `pred`."""
    pred, target = pred.float(), target.float()
    loss_instance = F.mse_loss(pred[:num_instance], target[:num_instance])
    if num_instance == pred.shape[0]:  # prior=none
        zero = loss_instance.new_zeros(())
        return loss_instance, loss_instance, zero
    loss_prior = F.mse_loss(pred[num_instance:], target[num_instance:])
    return loss_instance + prior_weight * loss_prior, loss_instance, loss_prior
