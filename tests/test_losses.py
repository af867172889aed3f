"""The loss equals the hand-written formula of the paper (§3.3), for epsilon and v targets."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from dreambench.losses import diffusion_target, prior_preservation_loss


def _sched(pt: str) -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=pt)


@pytest.mark.parametrize("weight", [1.0, 0.5, 0.0])
def test_prior_loss_is_instance_plus_lambda_prior(weight):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    loss, inst, prior = prior_preservation_loss(pred, target, num_instance=2, prior_weight=weight)
    # by hand: mean squared error over the first two samples, plus λ times that over the last two
    hand_inst = ((pred[:2] - target[:2]) ** 2).sum() / pred[:2].numel()
    hand_prior = ((pred[2:] - target[2:]) ** 2).sum() / pred[2:].numel()
    torch.testing.assert_close(inst, hand_inst)
    torch.testing.assert_close(prior, hand_prior)
    torch.testing.assert_close(loss, hand_inst + weight * hand_prior)


def test_no_prior_batch_is_the_instance_loss_alone():
    pred, target = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    loss, inst, prior = prior_preservation_loss(pred, target, num_instance=1, prior_weight=1.0)
    assert loss.item() == inst.item() == 1.0 and prior.item() == 0.0


def test_loss_is_fp32_under_bf16_predictions():
    pred = torch.randn(2, 4, 4, 4).bfloat16()
    loss, _, _ = prior_preservation_loss(pred, torch.zeros(2, 4, 4, 4), 1, 1.0)
    assert loss.dtype == torch.float32


def test_epsilon_target_is_the_noise():
    s = _sched("epsilon")
    x0, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    assert torch.equal(diffusion_target("epsilon", x0, eps, t, s.alphas_cumprod), eps)


def test_v_target_matches_formula_and_diffusers():
    s = _sched("v_prediction")
    x0, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    v = diffusion_target("v_prediction", x0, eps, t, s.alphas_cumprod)
    a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0)
    torch.testing.assert_close(v, s.get_velocity(x0, eps, t))
    assert not torch.allclose(v, eps)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="sample"):
        diffusion_target("sample", torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.ones(10))
