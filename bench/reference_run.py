"""The reference whole run: diffusers' examples/dreambooth/train_dreambooth.py from the command to the exit, as
that script runs a DreamBooth job with prior preservation, written out without Accelerate (one process, one
device: what Accelerate adds there is a wrapper around the same calls) so `make bench` can time a whole
dreambench run against it (`bench.cases.case_whole_run`).

    python -m bench.reference_run --model DIR --instance-dir DIR --class-dir DIR --out DIR [--steps 300]

What the example does, in its order, and so does this script:
  import torch, transformers and diffusers at the top; load the tokenizer, the scheduler, the text encoder, the
  VAE and the UNet with `from_pretrained`; freeze the VAE and text encoder; AdamW over the UNet; a Dataset that
  opens, EXIF-rotates, converts, resizes (bilinear, short side), centre-crops and normalises each instance and
  class image when it is drawn, and tokenises both prompts; a shuffling DataLoader of batch 1 whose collate puts
  the class example after the instance one; a constant LR schedule; then per step: VAE-encode the pixels and
  sample the latent, noise, timesteps, `add_noise`, encode the prompts, one UNet forward, `torch.chunk`, MSE +
  prior MSE, backward, clip 1.0, AdamW, LR step, `zero_grad`, and `loss.detach().item()` for its progress bar;
  at the end `DiffusionPipeline.from_pretrained(model, unet=..., text_encoder=...)` and `save_pretrained`. No
  validation images (the example's default), no checkpoints (its default every 500 steps: none in 300), class
  images already there (it generates only missing ones). The Python interpreter then ends as usual.

It logs "reference: first training step at <ISO time>" and "reference: last training step ended at <ISO time>"
(UTC, milliseconds) to stderr, the same clock dreambench logs, so both are timed from outside the same way.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from PIL import Image
from PIL.ImageOps import exif_transpose
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPTextModel

from bench.reference_loop import reference_loss


def stamp(what: str) -> None:
    t = datetime.fromtimestamp(time.time(), timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    print(f"reference: {what} at {t}", file=sys.stderr, flush=True)


def transform(image: Image.Image, size: int) -> torch.Tensor:
    """The example's transforms.Resize(size, BILINEAR) + CenterCrop(size) + ToTensor() + Normalize([0.5], [0.5]),
    in PIL and numpy (there is no CPU torchvision build here)."""
    w, h = image.size
    s = size / min(w, h)
    image = image.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


class DreamBoothDataset(torch.utils.data.Dataset):
    def __init__(self, instance_dir: Path, instance_prompt: str, class_dir: Path, class_prompt: str, tokenizer,
                 size: int):
        self.instance_images = sorted(p for p in instance_dir.iterdir() if p.is_file())
        self.class_images = sorted(p for p in class_dir.iterdir() if p.is_file())
        self.instance_prompt, self.class_prompt = instance_prompt, class_prompt
        self.tokenizer, self.size = tokenizer, size
        self._length = max(len(self.class_images), len(self.instance_images))

    def __len__(self) -> int:
        return self._length

    def _ids(self, prompt: str) -> torch.Tensor:
        return self.tokenizer(prompt, truncation=True, padding="max_length", max_length=self.tokenizer.model_max_length,
                              return_tensors="pt").input_ids

    def __getitem__(self, index: int) -> dict:
        def load(path: Path) -> torch.Tensor:
            image = exif_transpose(Image.open(path))
            return transform(image.convert("RGB") if image.mode != "RGB" else image, self.size)
        return {"instance_images": load(self.instance_images[index % len(self.instance_images)]),
                "instance_prompt_ids": self._ids(self.instance_prompt),
                "class_images": load(self.class_images[index % len(self.class_images)]),
                "class_prompt_ids": self._ids(self.class_prompt)}


def collate_fn(examples: list[dict]) -> dict:
    input_ids = [e["instance_prompt_ids"] for e in examples] + [e["class_prompt_ids"] for e in examples]
    pixels = [e["instance_images"] for e in examples] + [e["class_images"] for e in examples]
    return {"input_ids": torch.cat(input_ids, dim=0),
            "pixel_values": torch.stack(pixels).to(memory_format=torch.contiguous_format).float()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--instance-dir", required=True, type=Path)
    ap.add_argument("--class-dir", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    tokenizer = AutoTokenizer.from_pretrained(a.model, subfolder="tokenizer", use_fast=False)
    noise_scheduler = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(a.model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=a.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    dataset = DreamBoothDataset(a.instance_dir, "a sks dog", a.class_dir, "a dog", tokenizer, a.resolution)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=True, collate_fn=collate_fn, num_workers=0)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=a.steps)
    unet.train()
    progress = tqdm(range(a.steps), desc="Steps", disable=not sys.stderr.isatty())
    step = 0
    while step < a.steps:
        for batch in loader:
            if step == 0:
                stamp("first training step")
            latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
            encoder_hidden_states = text_encoder(batch["input_ids"])[0]
            # add_noise, the UNet, chunk, MSE + prior MSE: the step bench/reference_loop.py checks against dreambench
            loss = reference_loss(unet, noise_scheduler, latents, noise, timesteps, encoder_hidden_states, 1.0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.update(1)
            progress.set_postfix(loss=loss.detach().item(), lr=lr_scheduler.get_last_lr()[0])
            step += 1
            if step >= a.steps:
                break
    stamp("last training step ended")
    pipeline = DiffusionPipeline.from_pretrained(a.model, unet=unet, text_encoder=text_encoder)
    pipeline.save_pretrained(a.out)


if __name__ == "__main__":
    main()
