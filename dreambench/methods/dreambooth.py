from __future__ import annotations

from pathlib import Path
from typing import Any

from dreambench.methods.base import Method


class DreamBooth(Method):
    """Full fine-tuning of the UNet (paper §3), and of the text encoder with its own learning rate if
    `train_text_encoder`. Exports the whole pipeline."""

    name = "dreambooth"

    def __init__(self, train_text_encoder: bool = False, text_encoder_lr: float | None = None):
        self.train_text_encoder = bool(train_text_encoder)
        self.text_encoder_lr = text_encoder_lr

    def prepare(self, module: Any) -> None:
        module.unet.requires_grad_(True).train()
        for _, te in module.named_text_encoders(trainable=True):  # SDXL: both CLIP encoders, as its peers
            te.requires_grad_(self.train_text_encoder)
            te.train(self.train_text_encoder)

    def param_groups(self, module: Any, lr: float) -> list[dict[str, Any]]:
        groups = [{"params": [p for p in module.unet.parameters() if p.requires_grad], "lr": lr}]
        if self.train_text_encoder:
            groups.append({"params": [p for _, te in module.named_text_encoders(trainable=True)
                                      for p in te.parameters() if p.requires_grad],
                           "lr": float(self.text_encoder_lr if self.text_encoder_lr is not None else lr)})
        return groups

    def trained_prefixes(self, module: Any) -> tuple[str, ...]:
        if not self.train_text_encoder:
            return ("unet.",)
        return ("unet.", *(f"{n}." for n, _ in module.named_text_encoders(trainable=True)))

    def export(self, module: Any, folder: Path) -> None:
        module.base_pipeline().save_pretrained(folder, safe_serialization=True)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "train_text_encoder": self.train_text_encoder}
