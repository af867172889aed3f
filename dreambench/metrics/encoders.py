"""Image/text encoders of the DreamBench protocol (shared/docs/PROTOCOL.md, "Metrics"), loaded by hub id or local
folder, and the tiny randomly initialised stand-ins that tests and smoke runs build and load the same way."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# ImageNet statistics, as DINO's own eval transform (torchvision Normalize) uses them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _local_path(name_or_path: str) -> Path:
    return Path(os.path.expanduser(str(name_or_path)))


def _ensure_tiny(name_or_path: str, tiny: Mapping[str, Any] | None, build) -> str:
    """With `tiny` set, a missing folder is filled once with a seeded random model (atomic: built aside, then
    renamed, so parallel test workers never see half a folder). The caller then loads it with the same
    from_pretrained as a hub id, so the tiny path exercises the real loading code."""
    if not tiny:
        return str(name_or_path)
    path = _local_path(name_or_path)
    if (path / "config.json").is_file():
        return str(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(tiny.get("seed", 0)))
        build(tmp, dict(tiny))
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first: keep theirs (same seed, same weights)
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _features(out) -> torch.Tensor:
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output holds the *projected* embedding;
    # transformers 4 returned the tensor itself.
    if isinstance(out, torch.Tensor):
        return out
    for key in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find an embedding tensor in {type(out).__name__}")


def _normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# ----------------------------------------------------------------------------------------------------------- DINO

def dino_preprocess(images: Sequence[Image.Image], resize: int = 256, crop: int = 224) -> torch.Tensor:
    """DINO's eval transform, done explicitly (the HF processor of facebook/dino-vits16 squashes to 224x224):
    short side -> `resize` bicubic, centre crop `crop`, [0,1], ImageNet mean/std. Returns (N, 3, crop, crop)."""
    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        # torchvision.transforms.Resize(int) arithmetic: the long side is truncated, not rounded.
        if w <= h:
            size = (resize, int(resize * h / w))
        else:
            size = (int(resize * w / h), resize)
        if size != (w, h):
            im = im.resize(size, Image.BICUBIC)
        w, h = im.size
        # torchvision.transforms.CenterCrop offsets.
        left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
        im = im.crop((left, top, left + crop, top + crop))
        out.append(np.asarray(im, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def build_tiny_dino(save_dir: str | Path, spec: Mapping[str, Any] | None = None) -> None:
    from transformers import ViTConfig, ViTModel

    spec = dict(spec or {})
    config = ViTConfig(hidden_size=spec.get("hidden_size", 32), num_hidden_layers=spec.get("layers", 2),
                       num_attention_heads=4, intermediate_size=spec.get("hidden_size", 32) * 2,
                       image_size=224, patch_size=16, layer_norm_eps=1e-6)
    ViTModel(config, add_pooling_layer=False).save_pretrained(str(save_dir), safe_serialization=True)


class DinoEncoder:
    """DINO ViT-S/16 image embeddings: the CLS token after the final LayerNorm (`last_hidden_state[:, 0]`),
    L2-normalised. Never `pooler_output`: facebook/dino-vits16 has no pooler, transformers would invent one."""

    def __init__(self, name_or_path: str = "facebook/dino-vits16", resize: int = 256, crop: int = 224,
                 layer_norm_eps: float | None = 1e-6, tiny: Mapping[str, Any] | None = None,
                 batch_size: int = 32, device: str | None = "auto"):
        from transformers import ViTModel

        self.name_or_path = str(name_or_path)
        path = _ensure_tiny(self.name_or_path, tiny, build_tiny_dino)
        kwargs: dict[str, Any] = {}
        # The original DINO uses LayerNorm eps 1e-6; the transformers port says 1e-12 (PROTOCOL.md, library
        # notes). null keeps the checkpoint's value.
        if layer_norm_eps is not None:
            kwargs["layer_norm_eps"] = float(layer_norm_eps)
        self.device = resolve_device(device)
        self.model = ViTModel.from_pretrained(path, add_pooling_layer=False, use_safetensors=True, **kwargs)
        self.model.eval().to(self.device)
        self.resize, self.crop, self.batch_size = int(resize), int(crop), int(batch_size)
        self.layer_norm_eps = self.model.config.layer_norm_eps

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) float32 unit vectors on the CPU."""
        chunks = []
        for batch in _batches(list(images), self.batch_size):
            x = dino_preprocess(batch, self.resize, self.crop).to(self.device)
            chunks.append(_normalise(self.model(pixel_values=x).last_hidden_state[:, 0]).cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, self.model.config.hidden_size)

    def card(self) -> dict[str, Any]:
        return {"model": self.name_or_path, "class": type(self.model).__name__,
                "embedding": "last_hidden_state[:, 0] (CLS after the final LayerNorm), L2-normalised",
                "layer_norm_eps": self.layer_norm_eps,
                "preprocess": f"short side {self.resize} bicubic, centre crop {self.crop}, [0,1], "
                              f"ImageNet mean {list(IMAGENET_MEAN)} std {list(IMAGENET_STD)}"}


# ----------------------------------------------------------------------------------------------------------- CLIP

def _clip_image_processor_cls():
    # transformers 5 splits the PIL backend out (the default one needs torchvision, which we do not have).
    try:
        from transformers import CLIPImageProcessorPil
        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor


def build_tiny_clip(save_dir: str | Path, spec: Mapping[str, Any] | None = None) -> None:
    from transformers import CLIPConfig, CLIPModel

    from dreambench.models.tokenizer import build_tiny_tokenizer

    spec = dict(spec or {})
    hidden = spec.get("hidden_size", 32)
    tok = build_tiny_tokenizer(save_dir)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=spec.get("layers", 2), num_attention_heads=4,
                         max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=spec.get("layers", 2),
                           num_attention_heads=4, image_size=224, patch_size=32),
        projection_dim=spec.get("projection_dim", 16),
    )
    CLIPModel(config).save_pretrained(str(save_dir), safe_serialization=True)
    _clip_image_processor_cls()().save_pretrained(str(save_dir))  # CLIP's defaults: 224 bicubic, crop, CLIP stats


class ClipEncoder:
    """CLIP projected image and text embeddings (CLIP-I, CLIP-T), L2-normalised, with CLIP's own processor."""

    def __init__(self, name_or_path: str = "openai/clip-vit-base-patch32", tiny: Mapping[str, Any] | None = None,
                 batch_size: int = 32, device: str | None = "auto"):
        from transformers import CLIPModel, CLIPTokenizer

        self.name_or_path = str(name_or_path)
        path = _ensure_tiny(self.name_or_path, tiny, build_tiny_clip)
        self.device = resolve_device(device)
        self.model = CLIPModel.from_pretrained(path, use_safetensors=True).eval().to(self.device)
        self.processor = _clip_image_processor_cls().from_pretrained(path)
        self.tokenizer = CLIPTokenizer.from_pretrained(path)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        chunks = []
        for batch in _batches(list(images), self.batch_size):
            # uint8 PIL images, so the processor's 1/255 rescale is the only one.
            pixels = self.processor(images=[im.convert("RGB") for im in batch], return_tensors="pt")["pixel_values"]
            out = self.model.get_image_features(pixel_values=pixels.to(self.device))
            chunks.append(_normalise(_features(out)).cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, self.model.config.projection_dim)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        chunks = []
        for batch in _batches(list(texts), self.batch_size):
            enc = self.tokenizer(list(batch), padding=True, truncation=True, max_length=77, return_tensors="pt")
            out = self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                               attention_mask=enc["attention_mask"].to(self.device))
            chunks.append(_normalise(_features(out)).cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, self.model.config.projection_dim)

    def card(self) -> dict[str, Any]:
        p = self.processor
        return {"model": self.name_or_path, "class": type(self.model).__name__,
                "embedding": "get_image_features / get_text_features (projected), L2-normalised",
                "preprocess": f"CLIP processor: short side {dict(p.size)} resample {int(p.resample)}, centre crop "
                              f"{dict(p.crop_size)}, mean {list(p.image_mean)} std {list(p.image_std)}, "
                              f"uint8 input rescaled once"}


# ------------------------------------------------------------------------------------- real-size configs (bench)

def random_vit_s16() -> torch.nn.Module:
    # facebook/dino-vits16's architecture, random weights (for timing only).
    from transformers import ViTConfig, ViTModel
    return ViTModel(ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                              image_size=224, patch_size=16, layer_norm_eps=1e-6), add_pooling_layer=False)


def random_clip_b32() -> torch.nn.Module:
    # openai/clip-vit-base-patch32's architecture (CLIPConfig's defaults), random weights (for timing only).
    from transformers import CLIPConfig, CLIPModel
    return CLIPModel(CLIPConfig())
