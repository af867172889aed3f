"""Non-finite losses and gradients, fp32 master weights, and a VAE kept in fp32 where fp16 would overflow.

Lightning no longer stops on a NaN loss (ECOSYSTEM.md): a diverged run trains on for hours and exports black
images. NumericsGuard checks the loss and the gradients before every optimizer step, i.e. before the weights
can be touched, so the weights (and any checkpoint written later) are those of the last good step.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import lightning as L
import torch

log = logging.getLogger("dreambench")


class NonFiniteError(RuntimeError):
    """The run stopped on a non-finite loss or gradient; the entry point prints it as one line (exit code 4)."""


def _grad_norms(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return []
    return list(torch._foreach_norm(grads))  # one kernel per device/dtype group, not one per tensor


class NumericsGuard(L.Callback):
    """`on_nonfinite`: stop (raise NonFiniteError before the optimizer step) | skip (drop this step's gradients,
    so AdamW leaves every weight and moment untouched; the LR schedule and step count still advance).

    Cost: one 0-d boolean read back to the host per optimizer step (on a GPU that is one sync per step; the loss
    and all gradient norms are reduced on the device first, so it is a single sync, not one per tensor).
    With a GradScaler (16-mixed on a GPU) inf gradients are the scaler's business — it skips the step and lowers
    the scale — so only the loss is checked there."""

    def __init__(self, on_nonfinite: str = "stop"):
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"train.on_nonfinite={on_nonfinite!r} must be stop or skip")
        self.mode = on_nonfinite
        self.skipped: list[int] = []
        self._loss: torch.Tensor | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        # Mixed precision keeps fp32 master weights; a half-precision trainable weight (16-true, an fp16 load)
        # loses small updates and cannot be unscaled (diffusers' example refuses it for the same reason).
        bad = [n for n, p in pl_module.named_parameters() if p.requires_grad and p.dtype != torch.float32]
        if bad:
            from dreambench.errors import UserError
            raise UserError(f"trainable weights must be fp32, {len(bad)} are not (e.g. {bad[0]}: "
                                 f"{dict(pl_module.named_parameters())[bad[0]].dtype}); use trainer.precision="
                                 f"bf16-mixed or 16-mixed, not a *-true half precision")

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        checks = [] if self._loss is None else [torch.isfinite(self._loss).all()]
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            norms = _grad_norms(optimizer)
            if norms:
                checks.append(torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms])).all())
        if not checks or bool(torch.stack([c.to(checks[0].device) for c in checks]).all()):  # the one sync
            return
        step = trainer.global_step + 1
        loss = float(self._loss) if self._loss is not None else float("nan")
        what = f"non-finite loss ({loss})" if not torch.isfinite(torch.tensor(loss)) else "non-finite gradient"
        where = f"{what} at training step {step} of {trainer.max_steps}"
        if self.mode == "stop":
            raise NonFiniteError(f"{where}: the run stops; weights and checkpoints are those of the last good step "
                                 f"(lower optimizer.lr, or train.on_nonfinite=skip to drop such steps)")
        log.warning("%s: step skipped (train.on_nonfinite=skip)", where)
        self.skipped.append(step)
        for g in optimizer.param_groups:
            for p in g["params"]:
                p.grad = None
        pl_module.log("train/skipped_steps", float(len(self.skipped)))


def vae_needs_fp32(mode: Any, precision: Any, force_upcast: bool | None) -> bool:
    """`model.vae_fp32`: true | false | auto. auto: fp32 whenever the frozen VAE would run in fp16 (a 16-mixed or
    16-true trainer) and its config asks for it (`force_upcast`, set by diffusers for VAEs known to overflow in
    fp16 such as SDXL's; AutoencoderKL defaults it to True). bf16 has fp32's exponent range: no upcast needed."""
    if isinstance(mode, bool):
        return mode
    m = str(mode).lower()
    if m in ("true", "false"):
        return m == "true"
    if m != "auto":
        raise ValueError(f"model.vae_fp32={mode!r} must be auto, true or false")
    half = str(precision).split("-")[0] in ("16", "half")
    return half and bool(True if force_upcast is None else force_upcast)


def keep_vae_fp32(vae: torch.nn.Module) -> torch.nn.Module:
    """Make vae.encode / vae.decode run in fp32 even inside an fp16 autocast region (latent caching, class
    images, sample grids and pipelines all call these two). Idempotent."""
    if any(p.dtype != torch.float32 for p in vae.parameters()):
        vae.to(torch.float32)
    if getattr(vae, "_dreambench_fp32", False):
        return vae
    for name in ("encode", "decode"):
        fn = getattr(vae, name)

        @functools.wraps(fn)
        def wrapped(x, *args, __fn=fn, **kwargs):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return __fn(x.float(), *args, **kwargs)
        setattr(vae, name, wrapped)
    vae._dreambench_fp32 = True
    return vae
