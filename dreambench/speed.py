"""Speed switches of a training run, each one config key; `make bench` shows what each is worth.

    model.channels_last   UNet weights in NHWC: cuDNN's fastest conv kernels under bf16/fp16 (tensor cores)
    model.compile         torch.compile the UNet's forward in place (parameter names, checkpoints unchanged)
    model.frozen_dtype    auto: frozen VAE / text encoder in the autocast dtype on a GPU (no fp32 copy needed)
    optimizer.fused       null: fused AdamW wherever torch has the kernel for the parameters' device
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import torch

from dreambench.memory import resolve_frozen_dtype

log = logging.getLogger("dreambench")


def apply_channels_last(unet: torch.nn.Module, enabled: bool) -> None:
    if enabled:
        unet.to(memory_format=torch.channels_last)


def cast_frozen(module: Any, setting: Any, precision: str, device: torch.device) -> None:
    """Frozen VAE (unless kept fp32 on purpose, see resilience.numerics) and frozen text encoder to the
    autocast dtype. Their fp32 tensors are kept on the host so that an exported pipeline carries the base
    model's exact weights, not a bf16 round trip (`restore_frozen`)."""
    dtype = resolve_frozen_dtype(setting, str(precision), device.type == "cuda")
    if dtype is None or dtype == torch.float32:
        return
    keep: dict[str, dict[str, torch.Tensor]] = {}
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):  # SDXL's / SD 3.5's, Flux's T5
        m = getattr(module, name, None)
        if m is None:
            continue
        if any(p.requires_grad for p in m.parameters()) or getattr(m, "_dreambench_fp32", False):
            continue
        keep[name] = {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()}
        m.to(dtype=dtype)
    module._frozen_fp32 = keep
    if keep:
        log.info("frozen %s in %s (model.frozen_dtype=%s)", " and ".join(keep), dtype, setting)
    cast_adapter_base(getattr(module, "unet", None), dtype, str(precision))


def cast_adapter_base(denoiser: Any, dtype: torch.dtype, precision: str) -> int:
    """The frozen base of an adapter method (LoRA: some of the denoiser's parameters train, the rest do not) in
    `dtype`, the adapters left fp32, as diffusers' LoRA scripts cast the base to the weight dtype: half the base's
    memory (SDXL 5 GB, Flux 24 GB). Only under mixed precision, where autocast brings each input to the weights'
    dtype. Nothing is kept for export: an adapter run exports its adapters, never the base. Returns the number of
    parameters cast."""
    if denoiser is None or "mixed" not in precision:
        return 0
    params = list(denoiser.parameters())
    if not any(p.requires_grad for p in params) or all(p.requires_grad for p in params):
        return 0
    n = 0
    for p in params:
        if not p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += p.numel()
    log.info("the denoiser's frozen base (%.1f M parameters) in %s; the adapters stay fp32", n / 1e6, dtype)
    return n


def restore_frozen(module: Any) -> None:
    for name, state in (getattr(module, "_frozen_fp32", None) or {}).items():
        m = getattr(module, name)
        m.to(dtype=torch.float32)
        m.load_state_dict(state)
    module._frozen_fp32 = {}


def compile_unet(unet: torch.nn.Module, enabled: bool) -> None:
    # nn.Module.compile compiles forward in place: state_dict keys keep their names (torch.compile(m) would
    # wrap them under `_orig_mod.`, breaking checkpoints and export). The first steps pay the compile time.
    if enabled:
        unet.compile()


def optimizer_kwargs(opt_cfg: Any, params: list[torch.Tensor]) -> dict[str, Any]:
    """`optimizer.fused: null` -> fused when the optimizer takes `fused` and torch has the fused kernel for
    every parameter's device and dtype (CUDA, and CPU since torch 2.4); true / false are passed as given."""
    if "fused" not in opt_cfg or opt_cfg.get("fused") is not None:
        return {}
    from hydra.utils import get_class
    cls = get_class(str(opt_cfg._target_))
    if "fused" not in inspect.signature(cls).parameters:
        return {}
    from torch.optim.optimizer import _get_fused_kernels_supported_devices
    ok_devices = set(_get_fused_kernels_supported_devices())
    ok = bool(params) and all(p.device.type in ok_devices and p.is_floating_point() for p in params)
    return {"fused": ok}


def allow_clipping(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Lightning's mixed-precision plugin (2.6) refuses gradient clipping for any optimizer whose class sets
    `_step_supports_amp_scaling` (fused AdamW does) - under bf16-mixed too, where no gradient scaler exists and
    clipping before a fused step is plain correct. The flag only tells a GradScaler it may hand the scale to
    the fused kernel instead of unscaling the gradients itself; turned off on this instance, a 16-mixed scaler
    unscales first (before the clip, as Lightning does for other optimizers) and then steps: also correct."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer._step_supports_amp_scaling = False
    return optimizer


class FirstStepClock:
    """Logs when the first training step starts (`what="first training step"`; the last one's end: "last training
    step ended"): seconds since the process started, and the UTC clock time to the millisecond (ISO 8601: what a
    person reads, and what `make bench` parses to time command -> first step and last step -> exit from
    outside)."""

    def __init__(self, what: str = "first training step"):
        self.done = False
        self.what = what

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            from datetime import datetime, timezone

            import psutil  # installed with wandb; the process's own start time, not this module's import
            now = time.time()
            stamp = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            log.info("%s %.1f s after the command started (at %s)", self.what,
                     now - psutil.Process().create_time(), stamp)


HOST_READS = [0]  # deliberate device -> host reads (read_back), for make bench's sync count


def read_back(t: Any) -> list[float]:
    """A small device tensor's values on the host: the one deliberate sync of a logging step. `.tolist()`
    dispatches no `aten._local_scalar_dense`, so the bench's counter would not see it; this count does."""
    HOST_READS[0] += 1
    return t.detach().reshape(-1).tolist()
