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
    """`on_nonfinite`: stop (NonFiniteError; the weights stay those of the last good step) | skip (this step's
    update is dropped: AdamW leaves every weight, moment and its step count untouched; the LR schedule and the
    trainer's step count still advance).

    Without a host sync per step (fused Adam/AdamW, no GradScaler: the default): the loss and all gradient norms
    are reduced on the device into one flag, handed to the fused kernel as its `found_inf` (the argument
    GradScaler uses to skip a step without a sync), so a bad step's update never happens. In stop mode the flag
    is sticky: every later step is dropped too. The flag and the first bad step are read back once per logging
    step, before any checkpoint is written and at the last step; then the run stops naming the step, or the
    skipped steps are reported and logged (`train/skipped_steps`).
    Otherwise (another optimizer, or a GradScaler under 16-mixed: inf gradients are then the scaler's business
    and only the loss is checked) the flag is read back every step and the gradients are dropped on the host.
    """

    def __init__(self, on_nonfinite: str = "stop"):
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"train.on_nonfinite={on_nonfinite!r} must be stop or skip")
        self.mode = on_nonfinite
        self.skipped: list[int] = []  # the host path's skipped steps (the device path counts in _state)
        self._loss: torch.Tensor | None = None
        # On the device: [first bad step (0: none), its loss, steps dropped so far]; read back at checks only.
        self._state: torch.Tensor | None = None
        self._reported = 0

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

    @staticmethod
    def _on_device(trainer, optimizer) -> bool:
        """The fused Adam(W) kernel can drop a step on a device flag (`found_inf`); a GradScaler owns it."""
        return (getattr(trainer.precision_plugin, "scaler", None) is None
                and isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)
                and bool(optimizer.defaults.get("fused")))

    def _bad_flag(self, trainer, optimizer, norms: list[torch.Tensor] | None = None) -> torch.Tensor | None:
        """A 0-d bool on the device: the loss or a gradient is not finite (None: nothing to check). `norms`: the
        gradients' norms if already computed (the clip's total norm)."""
        checks = [] if self._loss is None else [~torch.isfinite(self._loss).all()]
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            norms = _grad_norms(optimizer) if norms is None else norms
            if norms:
                checks.append(~torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms])).all())
        if not checks:
            return None
        return torch.stack([c.to(checks[0].device) for c in checks]).any()

    @staticmethod
    def checks_after_clip(trainer, pl_module) -> bool:
        """The module clips by norm and hands the clip's total norm to `after_clip` (DreamBoothModule's
        configure_gradient_clipping): a gradient is non-finite exactly when that norm is, so the guard reads it
        instead of a second pass over every gradient. Not under a GradScaler (the scaler unscales, then clips)."""
        algorithm = getattr(trainer, "gradient_clip_algorithm", None) or "norm"
        return (getattr(pl_module, "clip_feeds_guard", False) and bool(getattr(trainer, "gradient_clip_val", None))
                and getattr(algorithm, "value", algorithm) == "norm"
                and getattr(trainer.precision_plugin, "scaler", None) is None)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.checks_after_clip(trainer, pl_module):
            return  # after_clip, a moment later in the same step, before the update
        self._act(trainer, pl_module, optimizer, self._bad_flag(trainer, optimizer))

    def after_clip(self, trainer, pl_module, optimizer, norms: list[torch.Tensor]) -> None:
        """`norms`: the clip's total norm ([] when no parameter has a gradient: the loss alone is checked)."""
        self._act(trainer, pl_module, optimizer, self._bad_flag(trainer, optimizer, norms))

    def _act(self, trainer, pl_module, optimizer, bad: torch.Tensor | None) -> None:
        if bad is None:
            return
        step = trainer.global_step + 1
        if not self._on_device(trainer, optimizer):
            if not bool(bad):  # the one sync of the step
                return
            loss = float(self._loss) if self._loss is not None else float("nan")
            self._stop_or_skip(trainer, pl_module, [step, loss, 1.0], host=True, optimizer=optimizer)
            return
        loss = self._loss.float() if self._loss is not None else torch.zeros((), device=bad.device)
        if self._state is None:
            self._state = torch.zeros(3, dtype=torch.float64, device=bad.device)
        first, n = self._state[0], self._state[2]
        new_first = (first == 0) & bad
        skip = bad | (first > 0) if self.mode == "stop" else bad  # stop: every step after the first bad is dropped
        # Python scalars in torch.where / + stay kernel arguments: no host-to-device copy either.
        self._state = torch.stack([torch.where(new_first, float(step), first),
                                   torch.where(new_first, loss.to(torch.float64), self._state[1]),
                                   n + skip.to(torch.float64)])
        # Read by the fused kernel on the device: the update, moments and step count of a bad step stay as they
        # were, with no host sync (the same mechanism as torch.amp.GradScaler's found_inf).
        optimizer.found_inf = skip.to(device=optimizer.param_groups[0]["params"][0].device, dtype=torch.float32)
        if pl_module is not None:  # DreamBoothModule reads these with its losses on logging steps: no extra sync
            pl_module._device_flags = self._state

    def _check(self, trainer, pl_module, fresh: bool = True) -> None:
        """Act on any bad step since the last check. `fresh=False` (a logging step): the flags the module read
        with its losses this step, as of the update before (so a bad step is known one step later; the flag
        has dropped its update already); otherwise a read of its own."""
        if self._state is None:
            return
        from dreambench.speed import read_back
        read = getattr(pl_module, "_flags_read", None)
        if not fresh and read is not None and read[0] == int(trainer.global_step):
            first, loss, n = read[1]
        else:
            first, loss, n = read_back(self._state)
        if first > 0 and (self.mode == "stop" or n > self._reported):
            self._stop_or_skip(trainer, pl_module, [int(first), loss, n], host=False)

    def _stop_or_skip(self, trainer, pl_module, state: list, host: bool, optimizer=None) -> None:
        first, loss, n = int(state[0]), float(state[1]), int(state[2])
        what = f"non-finite loss ({loss})" if not torch.isfinite(torch.tensor(loss)) else "non-finite gradient"
        where = f"{what} at training step {first} of {trainer.max_steps}"
        if self.mode == "stop":
            raise NonFiniteError(f"{where}: the run stops; weights and checkpoints are those of the last good step "
                                 f"(lower optimizer.lr, or train.on_nonfinite=skip to drop such steps)")
        if host:  # this very step: drop its gradients, AdamW then leaves those weights alone
            log.warning("%s: step skipped (train.on_nonfinite=skip)", where)
            self.skipped.append(first)
            for g in optimizer.param_groups:
                for p in g["params"]:
                    p.grad = None
            pl_module.log("train/skipped_steps", float(len(self.skipped)))
            return
        more = n - self._reported
        if self._reported == 0:
            log.warning("%s: step skipped (train.on_nonfinite=skip)%s", where,
                        f"; {more - 1} later step(s) skipped too" if more > 1 else "")
        else:
            log.warning("%d more step(s) with a non-finite loss or gradient skipped by step %d (train.on_nonfinite="
                        "skip); %d in all", more, trainer.global_step, n)
        self._reported = n
        trainer.callback_metrics["train/skipped_steps"] = torch.tensor(float(n))
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics({"train/skipped_steps": float(n)}, step=trainer.global_step - 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)  # updates done, this one included
        if step >= int(trainer.max_steps):
            self._check(trainer, pl_module)  # the end: this step too
        elif step % max(1, int(trainer.log_every_n_steps)) == 0:
            self._check(trainer, pl_module, fresh=False)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._check(trainer, pl_module)  # stop mode raises here: no checkpoint of a run gone bad is written


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
