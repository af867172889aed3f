from __future__ import annotations

from pathlib import Path
from typing import Any

from dreambench.methods.base import Method
from dreambench.methods.runs import write_method_json

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name `pipeline.load_lora_weights(folder)` looks for


class LoRA(Method):
    """DreamBooth with low-rank adapters (Hu et al. 2021) instead of full fine-tuning: the base weights stay
    frozen, `rank`-r matrices A, B are added to the UNet's attention projections (and optionally the text
    encoder's), as diffusers' examples/dreambooth/train_dreambooth_lora.py does. The run exports only the
    adapters, in the diffusers LoRA format that `StableDiffusionPipeline.load_lora_weights` reads."""

    name = "lora"

    def __init__(
        self,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        target_modules: list[str] | tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0"),
        train_text_encoder: bool = False,
        text_encoder_rank: int | None = None,
        text_encoder_target_modules: list[str] | tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj"),
        lr: float | None = 1e-4,
        text_encoder_lr: float | None = None,
    ):
        if int(rank) <= 0:
            raise ValueError(f"method.rank={rank} must be a positive integer")
        self.rank, self.alpha, self.dropout = (
            int(rank),
            float(alpha if alpha is not None else rank),
            float(dropout),
        )
        self.target_modules = list(target_modules)
        self.train_text_encoder = bool(train_text_encoder)
        self.text_encoder_rank = int(text_encoder_rank or rank)
        self.text_encoder_target_modules = list(text_encoder_target_modules)
        self.lr, self.text_encoder_lr = lr, text_encoder_lr

    def _config(self, rank: int, targets: list[str]):
        from peft import LoraConfig

        # "gaussian": A ~ N(0, 1/r), B = 0, so the adapted model starts exactly at the base model (the class
        # images rendered in setup() are the base model's).
        return LoraConfig(
            r=rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
        )

    def prepare(self, module: Any) -> None:
        module.unet.requires_grad_(False)
        module.unet.add_adapter(self._config(self.rank, self.target_modules))  # makes only lora_A/B trainable
        module.unet.train()
        if self.train_text_encoder:  # SDXL: both CLIP encoders, as train_dreambooth_lora_sdxl.py
            for _, te in module.named_text_encoders(trainable=True):
                te.requires_grad_(False)
                te.add_adapter(self._config(self.text_encoder_rank, self.text_encoder_target_modules))
                te.train()
        n = sum(p.numel() for p in module.parameters() if p.requires_grad)
        if n == 0:
            raise ValueError(
                f"method=lora: no module of the UNet matches target_modules={self.target_modules}"
            )

    def param_groups(self, module: Any, lr: float) -> list[dict[str, Any]]:
        unet_lr = float(self.lr if self.lr is not None else lr)
        groups = [{"params": [p for p in module.unet.parameters() if p.requires_grad], "lr": unet_lr}]
        if self.train_text_encoder:
            groups.append(
                {
                    "params": [p for _, te in module.named_text_encoders(trainable=True)
                               for p in te.parameters() if p.requires_grad],
                    "lr": float(self.text_encoder_lr if self.text_encoder_lr is not None else unet_lr),
                }
            )
        return groups

    def trained_prefixes(self, module: Any) -> tuple[str, ...]:
        # The full names of the adapter weights: a checkpoint keeps them and nothing of the frozen base.
        return tuple(n for n, p in module.named_parameters() if p.requires_grad)

    def export(self, module: Any, folder: Path) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        def layers(model):
            return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))

        tes = dict(module.named_text_encoders(trainable=True)) if self.train_text_encoder else {}
        # The adapter metadata (rank, alpha, targets) travels in the file, so a loader applies alpha / r exactly;
        # the family's pipeline class writes the key prefixes its load_lora_weights expects (SDXL: text_encoder_2).
        module.family.save_lora(folder, layers(module.unet), module.unet.peft_config["default"].to_dict(),
                                {n: layers(te) for n, te in tes.items()},
                                {n: te.peft_config["default"].to_dict() for n, te in tes.items()}, LORA_FILE)
        write_method_json(folder, module.run_cfg, {"method": self.name, "artefact": LORA_FILE})

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": self.target_modules,
            "train_text_encoder": self.train_text_encoder,
            "lr": self.lr,
        }

    @staticmethod
    def load_artefact(pipe, folder: Path, info: dict[str, Any]) -> None:
        pipe.load_lora_weights(str(folder), weight_name=info["artefact"])
