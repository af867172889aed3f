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


# ---- switches of the training loss and noise (conf: `loss.*`, docs/TOOLBOX.md); all off by default -------------

def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = a_t / (1 - a_t), a_t = alphas_cumprod[t]; [B] fp32. The same quantity as diffusers'
    `training_utils.compute_snr` ((sqrt(a) / sqrt(1 - a))²), read from the buffer the module already holds
    instead of a scheduler object, so it stays a pure tensor function."""
    a = alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    return a / (1 - a)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ (Hang et al., ICCV 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"): each
    sample's loss is weighted so that the x0-space weight becomes min(SNR, γ). For an epsilon target that is
    min(SNR, γ) / SNR, for a v target min(SNR, γ) / (SNR + 1) (as diffusers' train_text_to_image.py `--snr_gamma`
    and kohya's `apply_snr_weight(..., v_prediction=True)`). [B] -> [B]."""
    clipped = torch.clamp(snr_t, max=float(gamma))
    if prediction_type == "epsilon":
        # SNR = 0 (a zero-terminal-SNR schedule) would divide by zero; that schedule is refused for epsilon
        # models at load time (models/loading.py), so snr_t > 0 here.
        return clipped / snr_t
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    raise ValueError(f"min-SNR weighting: unsupported prediction_type {prediction_type!r}")


def offset_noise(shape: torch.Size | tuple[int, ...], strength: float, generator: torch.Generator,
                 device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Offset noise (N. Guttenberg, Crosslabs 2023, "Diffusion with offset noise"): strength x N(0, 1) per
    (sample, channel), constant over the latent's pixels, added to the noise — so the model also learns to move
    an image's mean brightness. [B, C, 1, 1] broadcasting over [B, C, H, W], as diffusers' `--noise_offset`."""
    return strength * torch.randn((shape[0], shape[1], 1, 1), generator=generator, device=device, dtype=dtype)


def weighted_loss(pred: torch.Tensor, target: torch.Tensor, num_instance: int, prior_weight: float,
                  sample_weights: torch.Tensor | None = None, mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`prior_preservation_loss` with per-sample weights [B] (min-SNR) and/or a per-pixel latent mask
    [B, 1, h, w] in [0, 1] (masked loss). Each sample's loss is mean_{c,h,w}(mask · (pred - target)²) · w_b
    (kohya's apply_masked_loss multiplies by the mask and takes the plain mean, it does not renormalise by the
    mask's area, and neither does this); the instance and prior parts are means over their samples. With neither
    weights nor mask it is exactly `prior_preservation_loss` (the same code path, bit for bit)."""
    if sample_weights is None and mask is None:
        return prior_preservation_loss(pred, target, num_instance, prior_weight)
    err = (pred.float() - target.float()) ** 2
    if mask is not None:
        err = err * mask.to(err.device, torch.float32)
    per_sample = err.mean(dim=tuple(range(1, err.ndim)))
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample.device, torch.float32)
    loss_instance = per_sample[:num_instance].mean()
    if num_instance == pred.shape[0]:
        return loss_instance, loss_instance, loss_instance.new_zeros(())
    loss_prior = per_sample[num_instance:].mean()
    return loss_instance + prior_weight * loss_prior, loss_instance, loss_prior


# ---- rectified flow (SD 3.5; model.flow) -------------------------------------------------------------------------

def flow_timestep_indices(batch: int, num_train_timesteps: int, scheme: str, logit_mean: float, logit_std: float,
                          mode_scale: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Indices into the scheduler's σ schedule: u ~ the scheme's density on [0, 1), index = floor(u · T), as
    diffusers' train_dreambooth_sd3.py (`compute_density_for_timestep_sampling`, Esser et al. 2024 §3.1):
    logit_normal (u = sigmoid(N(m, s))), mode (u = 1 - v - scale · (cos²(πv/2) - 1 + v)), uniform."""
    from diffusers.training_utils import compute_density_for_timestep_sampling
    if scheme not in ("logit_normal", "mode", "uniform"):
        raise ValueError(f"model.flow.timestep_sampling={scheme!r}: logit_normal, mode or uniform")
    u = compute_density_for_timestep_sampling(scheme, batch, logit_mean=logit_mean, logit_std=logit_std,
                                              mode_scale=mode_scale, device=device, generator=generator)
    return (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)


def flow_matching_pair(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target): x_t = (1 - σ) x0 + σ ε and the velocity target ε - x0 (rectified flow)."""
    s = sigmas.view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise, noise - x0


def flow_loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weights (diffusers' `compute_loss_weighting_for_sd3`): none (None: the plain loss path),
    sigma_sqrt (σ^-2), cosmap (2 / (π (1 - 2σ + 2σ²)))."""
    if scheme == "none":
        return None
    if scheme not in ("sigma_sqrt", "cosmap"):
        raise ValueError(f"model.flow.loss_weighting={scheme!r}: none, sigma_sqrt or cosmap")
    from diffusers.training_utils import compute_loss_weighting_for_sd3
    return compute_loss_weighting_for_sd3(scheme, sigmas.float())
