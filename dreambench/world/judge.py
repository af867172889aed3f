"""A judge of the toy world: a small CNN trained on the world's own drawings to name an image's class and
context. It answers "does the class prompt draw a recognisable member of the class in the named context?"
for `model=toy` (issue 12, item 2), the way a person would looking at the sample grid, but as a number.

It never sees a generated image while training, so it cannot be fooled into agreeing with the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dreambench.world.scene import CLASSES, CONTEXTS

CLASS_NAMES = list(CLASSES)
CONTEXT_NAMES = list(CONTEXTS)


class Judge(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        c = width
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.GELU(), nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2), nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.cls = nn.Linear(4 * c, len(CLASS_NAMES))
        self.ctx = nn.Linear(4 * c, len(CONTEXT_NAMES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.cls(h), self.ctx(h)


def _batch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@dataclass
class JudgeReport:
    heldout_class_accuracy: float
    heldout_context_accuracy: float


def train_judge(images: np.ndarray, classes: np.ndarray, contexts: np.ndarray, steps: int = 1500,
                batch: int = 64, seed: int = 0, progress: bool = True) -> tuple[Judge, JudgeReport]:
    """images: (N, H, W, 3) uint8 renders; the last 500 are held out for the report."""
    from dreambench.models.toy import one_cycle
    torch.manual_seed(seed)
    g = np.random.default_rng(seed)
    judge = Judge()
    n = len(images) - 500

    def loss():
        i = g.integers(0, n, batch)
        a, b = judge(_batch(images[i]))
        return F.cross_entropy(a, torch.from_numpy(classes[i])) + F.cross_entropy(b, torch.from_numpy(contexts[i]))

    judge.train()
    one_cycle(judge.parameters(), steps, 2e-3, loss, "toy world: judge", progress)
    judge.eval()
    pa, pb = predict(judge, images[n:])
    return judge, JudgeReport(float((pa == classes[n:]).mean()), float((pb == contexts[n:]).mean()))


@torch.no_grad()
def predict(judge: Judge, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    outs = [judge(_batch(images[i:i + 256])) for i in range(0, len(images), 256)]
    return (torch.cat([o[0] for o in outs]).argmax(1).numpy(), torch.cat([o[1] for o in outs]).argmax(1).numpy())
