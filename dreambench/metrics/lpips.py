"""LPIPS with an AlexNet trunk (Zhang et al. 2018, "lpips" v0.1), re-written in plain torch because the `lpips`
package needs torchvision, which has no CPU build here. No weights ship with dreambench: the user provides a
safetensors file holding the `lpips.LPIPS(net="alex")` state dict (AlexNet features + the learned linear layers),
e.g. made once elsewhere with:

    import lpips, safetensors.torch
    safetensors.torch.save_file(lpips.LPIPS(net="alex").state_dict(), "lpips_alex.safetensors")

Without it, DIV is reported as "unavailable" (never a made-up value).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

# AlexNet feature channels at the five ReLU taps LPIPS uses.
CHANNELS = (64, 192, 384, 256, 256)


class _Lin(nn.Module):
    # Key layout of lpips.NetLinLayer: model = Sequential(Dropout, Conv1x1 no bias).
    def __init__(self, c: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))


class _Alex(nn.Module):
    # torchvision.models.alexnet().features split at the ReLUs, with lpips' slice names (slice1..slice5) and
    # torchvision's layer indices inside them, so lpips state dict keys load unchanged.
    def __init__(self):
        super().__init__()
        layers = [nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2),
                  nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
                  nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()]
        bounds = (0, 2, 5, 8, 10, 12)
        for s in range(5):
            seq = nn.Sequential()
            for i in range(bounds[s], bounds[s + 1]):
                seq.add_module(str(i), layers[i])
            setattr(self, f"slice{s + 1}", seq)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for s in range(5):
            x = getattr(self, f"slice{s + 1}")(x)
            feats.append(x)
        return feats


class LPIPSAlex(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.net = _Alex()
        self.lins = nn.ModuleList([_Lin(c) for c in CHANNELS])

    @classmethod
    def from_file(cls, path: str | Path) -> "LPIPSAlex":
        from safetensors.torch import load_file

        state = load_file(str(path))
        # lpips stores the input scaling as scaling_layer.{shift,scale} and the linear layers twice
        # (lin0..lin4 and lins.0..lins.4); map onto this module's names.
        mapped = {}
        for k, v in state.items():
            if k.startswith("scaling_layer."):
                mapped[k.split(".", 1)[1]] = v.reshape(1, 3, 1, 1)
            elif k.startswith("lin") and not k.startswith("lins."):
                idx, rest = k[3:].split(".", 1)
                mapped[f"lins.{idx}.{rest}"] = v
            else:
                mapped[k] = v
        model = cls()
        missing, unexpected = model.load_state_dict(mapped, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: not an lpips AlexNet state dict (missing {missing[:3]}..., "
                             f"unexpected {unexpected[:3]}...)")
        return model.eval()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: (N, 3, H, W) in [-1, 1]. Returns (N,) distances."""
        fa, fb = self.net((a - self.shift) / self.scale), self.net((b - self.shift) / self.scale)
        total = 0
        for lin, x, y in zip(self.lins, fa, fb):
            x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit-normalise channels
            y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin.model((x - y) ** 2).mean(dim=(2, 3))  # spatial average
        return total.reshape(-1)


def to_lpips_input(images: Sequence[Image.Image], size: int | None = None) -> torch.Tensor:
    arrs = []
    for im in images:
        im = im.convert("RGB")
        if size:
            im = im.resize((size, size), Image.BICUBIC)
        arrs.append(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)


class LPIPSDistance:
    """Mean pairwise LPIPS over a group of images (DIV, PROTOCOL.md): the 6 pairs among 4 images."""

    def __init__(self, weights: str | Path, size: int | None = None, device: str | torch.device = "cpu"):
        self.weights = str(weights)
        self.size = size
        self.device = torch.device(device)
        self.model = LPIPSAlex.from_file(weights).to(self.device)

    @torch.no_grad()
    def group_mean(self, images: Sequence[Image.Image]) -> float:
        if len(images) < 2:
            raise ValueError("DIV needs at least 2 images per prompt")
        x = to_lpips_input(images, self.size).to(self.device)
        i, j = torch.triu_indices(len(images), len(images), offset=1)
        return float(self.model(x[i], x[j]).mean())

    def card(self) -> dict:
        return {"model": "LPIPS v0.1 AlexNet (plain-torch port)", "weights": self.weights,
                "resize": self.size, "pairs": "all distinct pairs among the images of one (subject, prompt)"}


def load_lpips(weights: str | None = None, size: int | None = None, device: str | None = "cpu"
               ) -> LPIPSDistance | str:
    """An LPIPSDistance, or the reason it is unavailable (a string that goes into metrics.json)."""
    if not weights:
        return "unavailable: no LPIPS AlexNet weights configured (metrics.lpips.weights)"
    path = Path(weights).expanduser()
    if not path.is_file():
        return f"unavailable: LPIPS weights file not found: {path}"
    from dreambench.metrics.encoders import resolve_device
    return LPIPSDistance(path, size=size, device=resolve_device(device))
