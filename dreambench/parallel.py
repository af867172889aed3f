"""Sharded full fine-tuning (`trainer=fsdp`): the trained denoiser's parameters, gradients and AdamW moments split
across the ranks with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`), through Lightning's
ModelParallelStrategy.

Lightning's FSDPStrategy (FSDP1) is not used: it refuses any accelerator but CUDA, so it cannot be tested on the
project's CPU machines. ModelParallelStrategy builds a device mesh on the ranks' own device type (gloo on CPU,
NCCL on CUDA) and leaves the sharding to `LightningModule.configure_model`, which calls `shard_trained` below.

What is sharded: each block of the denoiser (the UNet's down/up blocks, a transformer's blocks), then the denoiser
as a whole, and the text encoders when they are trained. Frozen parts (VAE, frozen text encoders) stay whole on
every rank: they hold no gradients or optimizer state. Checkpoints are full (gathered to rank 0, one file, the
same layout as any other run's), so a sharded run resumes exactly and its checkpoints load anywhere.

Sample grids, the drift monitor, the validation loss and EMA run a forward pass on rank 0 alone, which a sharded
module cannot do (each forward gathers the parameters from every rank): preflight refuses them with trainer=fsdp.
At the end the trained weights are gathered into whole modules on rank 0 (`gather_trained`) for the export.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# Settings that run a forward pass on rank 0 alone during training (see the module docstring).
RANK0_FORWARDS = {
    "train.samples": "sample grids",
    "train.drift.every_n_steps": "the drift monitor",
    "train.val_loss.every_n_steps": "the validation loss",
    "train.ema.enabled": "EMA of the weights",
}


def is_sharded(trainer: Any) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy
    return isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)


def uses_fsdp(cfg: Any) -> bool:
    """The composed config asks for ModelParallelStrategy (trainer=fsdp)."""
    strategy = cfg.trainer.get("strategy")
    return hasattr(strategy, "get") and str(strategy.get("_target_", "")).endswith("ModelParallelStrategy")


def fsdp_problems(cfg: Any) -> list[str]:
    """What trainer=fsdp cannot run, one line each (checked before any model loads)."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf
    problems = []
    method = get_class(cfg.method._target_).name
    if method != "dreambooth":
        problems.append(f"method={method}: trainer=fsdp shards a full fine-tune (method=dreambooth); "
                        "LoRA and textual inversion train too few weights to need it")
    for key, what in RANK0_FORWARDS.items():
        value = OmegaConf.select(cfg, key)
        if value:
            off = "false" if key in ("train.samples", "train.ema.enabled") else "0"
            problems.append(f"{key}={value}: {what} run a forward pass on rank 0 alone, which a sharded model cannot "
                            f"(set {key}={off}; sample the exported model with python -m dreambench.generate)")
    if bool(OmegaConf.select(cfg, "model.compile")):
        problems.append("model.compile=true with trainer=fsdp is not supported yet")
    return problems


def trained_modules(module: Any) -> list[tuple[str, torch.nn.Module]]:
    """The modules trainer=fsdp shards: the denoiser, and the text encoders when they are trained."""
    named = [("unet", module.unet)]
    if module.train_text_encoder:
        named += list(module.named_text_encoders(trainable=True))
    return named


def shard_trained(module: Any, mesh: Any) -> dict[str, int]:
    """fully_shard each block of every trained module (every element of its ModuleLists: a UNet's down/up
    blocks, a transformer's blocks, a text encoder's layers), then the module itself. Returns, per module, the
    parameters this rank holds after sharding."""
    from torch.distributed.fsdp import fully_shard
    held = {}
    for name, m in trained_modules(module):
        for block in _outer_blocks(m):
            fully_shard(block, mesh=mesh)
        fully_shard(m, mesh=mesh)
        held[name] = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in m.parameters())
    return held


def _outer_blocks(m: torch.nn.Module) -> list[torch.nn.Module]:
    """The elements of the outermost ModuleLists under `m` (a UNet's down_blocks[i], not the resnets inside them):
    FSDP2 shards each parameter once, by the innermost fully_shard call above it."""
    blocks = []
    for child in m.children():
        if isinstance(child, torch.nn.ModuleList):
            blocks += [b for b in child if any(p.requires_grad for p in b.parameters())]
        else:
            blocks += _outer_blocks(child)
    return blocks


def gather_trained(module: Any, rank: int) -> None:
    """Every rank calls it (a collective): the trained modules' full weights are gathered to rank 0, which puts
    whole, unsharded copies in their place, so that the export (and anything after training) sees plain modules.
    The other ranks keep their shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    for name, m in trained_modules(module):
        state = get_model_state_dict(m, options=opts)  # full on rank 0, empty elsewhere
        if rank != 0:
            continue
        # FSDP2 swaps the module's class for FSDP<Class>(FSDPModule, Class): the first base that is not FSDP's.
        cls = next(c for c in type(m).__mro__ if not issubclass(c, FSDPModule))
        # diffusers' models build from their config with from_config, transformers' with the class itself.
        plain = cls.from_config(m.config) if hasattr(cls, "from_config") else cls(m.config)
        plain.load_state_dict(state)
        plain.to(module.device)
        dtype = next(iter(state.values())).dtype
        if dtype != torch.float32:  # trained in bf16-true: keep its dtype (load_state_dict cast it to fp32)
            plain.to(dtype)
        plain.requires_grad_(False).eval()
        setattr(module, name, plain)
        log.info("trainer=fsdp: %s gathered to rank 0 (%d parameters)", name,
                 sum(p.numel() for p in plain.parameters()))

