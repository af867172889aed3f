"""Scoring throughput: images/s through DINO + CLIP image embedding (the cost of scoring a generated set), for
the tiny test encoders and for randomly initialised real-size ViT-S/16 and CLIP ViT-B/32 (built from config, no
weights). Median of several repeats; prints JSON.

    python bench/bench_scoring.py [--images 64] [--repeats 3] [--batch-size 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from dreambench.metrics.encoders import (ClipEncoder, DinoEncoder, _clip_image_processor_cls, random_clip_b32,
                                         random_vit_s16)
from dreambench.metrics.scorer import Scorer


def images(n: int, size: int = 512) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)).resize((size, size))
            for _ in range(n)]


def real_size_scorer(batch_size: int, device: str) -> Scorer:
    # Same classes and code paths as the hub checkpoints, random weights: saved and loaded like a local copy.
    tmp = tempfile.mkdtemp(prefix="bench-encoders-")
    random_vit_s16().save_pretrained(f"{tmp}/dino", safe_serialization=True)
    from dreambench.models.tokenizer import build_tiny_tokenizer

    random_clip_b32().save_pretrained(f"{tmp}/clip", safe_serialization=True)
    build_tiny_tokenizer(f"{tmp}/clip")
    _clip_image_processor_cls()().save_pretrained(f"{tmp}/clip")
    return Scorer(DinoEncoder(f"{tmp}/dino", batch_size=batch_size, device=device),
                  ClipEncoder(f"{tmp}/clip", batch_size=batch_size, device=device))


def tiny_scorer(batch_size: int, device: str) -> Scorer:
    tmp = tempfile.mkdtemp(prefix="bench-tiny-")
    return Scorer(DinoEncoder(f"{tmp}/dino", tiny={"seed": 0}, batch_size=batch_size, device=device),
                  ClipEncoder(f"{tmp}/clip", tiny={"seed": 0}, batch_size=batch_size, device=device))


def measure(scorer: Scorer, ims: list[Image.Image], repeats: int) -> dict:
    scorer.embed(ims[:2])  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        scorer.embed(ims)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"images": len(ims), "median_s": round(med, 4), "images_per_s": round(len(ims) / med, 2),
            "repeats_s": [round(t, 4) for t in times]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=512, help="generated image side, px (SD 1.5: 512)")
    a = ap.parse_args()
    ims = images(a.images, a.size)
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "device": a.device, "torch": torch.__version__},
           "what": "DINO + CLIP image embeddings incl. preprocessing (PIL decode excluded)",
           "tiny": measure(tiny_scorer(a.batch_size, a.device), ims, a.repeats),
           "vit_s16_plus_clip_b32_random": measure(real_size_scorer(a.batch_size, a.device), ims, a.repeats)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
