"""Shared pieces of the benchmark cases: statistics, the machine, synthetic images, configs, step clocks."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ARCH = Path(__file__).resolve().parent / "architectures"
# issue #6: UNet forward + backward on a 1 + 1 batch at 512² (64² latents, 77 tokens): 2 x 2.41 TFLOP.
SD15_STEP_FLOP = 4.8e12
# Dense bf16 tensor-core peak, FLOP/s (NVIDIA data sheets: H100 SXM 989.4 TFLOP/s; H200 the same chip).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def stats(values: list[float]) -> dict[str, Any]:
    v = sorted(values)
    q1, q3 = (statistics.quantiles(v, n=4, method="inclusive")[0::2] if len(v) >= 2 else (v[0], v[0]))
    return {"median": statistics.median(v), "q1": q1, "q3": q3, "min": v[0], "max": v[-1], "n": len(v),
            "values": v}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(Exception):
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": "cpu",
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    with contextlib.suppress(Exception):
        import diffusers
        import lightning
        info["diffusers"], info["lightning"] = diffusers.__version__, lightning.__version__
    return info


def synthetic_images(folder: Path, n: int, size: int = 512, seed: int = 0) -> Path:
    """Smooth random colour fields as PNGs: photo-sized inputs with no data set needed."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"{i:02d}.png")
    return folder


def compose(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hcompose("train", overrides=overrides)


def train_overrides(work: Path, run_dir: Path, steps: int, extra: list[str]) -> list[str]:
    """A dreambench run on the bench's synthetic subject and class images (prior=folder: no class-image
    generation inside the measurement), no sample grids, checkpoints or export, on the bench's torch threads:
    left to itself a run takes every usable core (`threads: null`), and in-process it would leave them set for
    the reference loop measured after it."""
    return [f"data.instance_dir={work / 'instance'}", "data.subject=bench", "data.class_noun=dog", "data.live=false",
            f"threads={torch.get_num_threads()}",
            "prior=folder", f"prior.folder={work / 'class'}", "logger=csv", f"paths.run_dir={run_dir}",
            f"trainer.max_steps={steps}", "train.samples=false", "train.checkpoint_every_n_steps=0",
            "train.export_model=false", "progress=false", *extra]


class StepClock:
    """Wall-clock marks at the start and end of every training step of a dreambench run, taken by wrapping
    DreamBoothModule's batch hooks for the duration of the context (bench-only instrumentation).
    `at_step(k, fn)` / `after_step(k, fn)` run fn() at the start / end of step k (e.g. reset CUDA peak-memory
    counters, start and stop a sync counter)."""

    def __init__(self, sync: bool = False, cpu_from: int = 0, cpu_to: int | None = None):
        self.starts: list[float] = []
        self.ends: list[float] = []
        # Process CPU time (what a step costs, whatever else the machine runs), read at the start of step
        # `cpu_from` and at the end of step `cpu_to` (the run's last; None: of every step from cpu_from on) only:
        # `time.process_time()` is a system call (~0.5 ms on this virtual machine), and two a step were counted
        # as dreambench's own cost against a reference loop that reads it twice in all.
        self.cpu_from, self.cpu_to = cpu_from, cpu_to
        self.cpu_start: float | None = None
        self.cpu_end: float | None = None
        self.sync = sync and torch.cuda.is_available()
        self.hooks: dict[int, Any] = {}
        self.end_hooks: dict[int, Any] = {}

    def at_step(self, k: int, fn) -> None:
        self.hooks[k] = fn

    def after_step(self, k: int, fn) -> None:
        self.end_hooks[k] = fn

    def __enter__(self):
        from dreambench.module import DreamBoothModule
        self.cls = DreamBoothModule
        self.orig_start, self.orig_end = DreamBoothModule.on_train_batch_start, DreamBoothModule.on_train_batch_end
        clock = self

        def start(mod, batch, batch_idx):
            if clock.sync:
                torch.cuda.synchronize()
            k = len(clock.starts)
            if k in clock.hooks:
                clock.hooks[k]()
            clock.starts.append(time.perf_counter())
            if k == clock.cpu_from:
                clock.cpu_start = time.process_time()
            return clock.orig_start(mod, batch, batch_idx)

        def end(mod, outputs, batch, batch_idx):
            r = clock.orig_end(mod, outputs, batch, batch_idx)
            if clock.sync:
                torch.cuda.synchronize()
            clock.ends.append(time.perf_counter())
            k = len(clock.ends) - 1
            if k == clock.cpu_to or (clock.cpu_to is None and k >= clock.cpu_from):
                clock.cpu_end = time.process_time()
            if k in clock.end_hooks:
                clock.end_hooks[k]()
            return r
        DreamBoothModule.on_train_batch_start, DreamBoothModule.on_train_batch_end = start, end
        return self

    def __exit__(self, *exc):
        self.cls.on_train_batch_start, self.cls.on_train_batch_end = self.orig_start, self.orig_end

    def steps_per_s(self, warmup: int) -> float:
        """Steps after the first `warmup` ones (set-up, allocator and compile warm-up excluded), from the
        start of step `warmup` to the end of the last step: the hooks' own overhead is inside, as Lightning's."""
        n = len(self.ends) - warmup
        if n < 1:
            raise RuntimeError(f"only {len(self.ends)} steps ran, {warmup} warm-up")
        return n / (self.ends[-1] - self.starts[warmup])

    def steps_per_cpu_s(self, warmup: int) -> float:
        if warmup != self.cpu_from or self.cpu_start is None or self.cpu_end is None or (
                self.cpu_to is not None and self.cpu_to != len(self.ends) - 1):
            raise RuntimeError(f"CPU time was read over steps {self.cpu_from}..{self.cpu_to}, not {warmup}.."
                               f"{len(self.ends) - 1}")
        return (len(self.ends) - warmup) / (self.cpu_end - self.cpu_start)


class SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts `aten._local_scalar_dense`: the op behind `.item()`, `bool(t)`, `float(t)`, `int(t)`, `.tolist()`
    on one element - the host-device synchronisations of a step on a GPU. Works on CPU tensors too, so the
    hot path can be checked without CUDA. Where each comes from is kept (the innermost project frame)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.where: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
            import traceback
            frames = [f for f in traceback.extract_stack()[:-1]
                      if "/torch/" not in f.filename and "/bench/common.py" not in f.filename]
            key = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
            self.where[key] = self.where.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def write_results(out: Path, prefix: str, latest: str, result: dict[str, Any], md: str) -> Path:
    """<out>/<prefix>-<time>.json and .md, the same as <out>/<latest>.json and .md; prints the markdown table.
    Returns the timestamped JSON's path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"{prefix}-{stamp}", latest):
        (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (out / f"{name}.md").write_text(md)
    print(md)
    return out / f"{prefix}-{stamp}.json"

