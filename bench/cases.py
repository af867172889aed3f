"""The benchmark cases. Each returns rows: {case, variant, what, unit, median, q1, q3, min, max, n, ...}."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    ARCH,
    PEAK_BF16,
    REPO,
    SD15_STEP_FLOP,
    StepClock,
    SyncCounter,
    compose,
    stats,
    synthetic_images,
    train_overrides,
)

NO_CUDA = "skipped: no CUDA device"


@dataclass
class Settings:
    work: Path                    # synthetic images, run folders
    reps: int = 5                 # repetitions of each measurement (interleaved across variants)
    warmup: int = 5               # steps not timed (allocator, autotuning, compile)
    steps: int = 40               # timed steps
    quick: bool = False
    cuda: bool = field(default_factory=torch.cuda.is_available)
    log: Any = print

    @property
    def instance_dir(self) -> Path:
        return self.work / "instance"

    @property
    def class_dir(self) -> Path:
        return self.work / "class"


def prepare_work(s: Settings) -> None:
    synthetic_images(s.instance_dir, 4, 512, seed=0)
    synthetic_images(s.class_dir, 4, 512, seed=1)


def row(case: str, variant: str, unit: str, values: list[float], what: str = "", **extra) -> dict[str, Any]:
    return {"case": case, "variant": variant, "unit": unit, "what": what, **stats(values), **extra}


def skipped(case: str, variant: str, reason: str, what: str = "") -> dict[str, Any]:
    return {"case": case, "variant": variant, "unit": "", "what": what, "skipped": reason}


def _with_syncs_and_peak(out: dict[str, Any], s: Settings, counter: Any, caught: list, cuda_debug: bool,
                         memory: bool) -> dict[str, Any]:
    """Adds host syncs per timed step (and CUDA ones, from the sync-debug warnings) and peak GPU memory."""
    if counter is not None:
        out["syncs_per_step"] = counter.count / s.steps
        out["sync_sites"] = counter.where
        if cuda_debug:
            out["cuda_syncs_per_step"] = sum("synchroniz" in str(w.message) for w in caught) / s.steps
    if memory and s.cuda:
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


# ---- one measurement each ---------------------------------------------------------------------------------------
def dreambench_steps(s: Settings, model: list[str], extra: list[str], tag: str, sync_count: bool = False,
                     memory: bool = False) -> dict[str, Any]:
    """The real `dreambench.train.train(cfg)` (DreamBoothModule in a Lightning Trainer, CSV logger, all its
    callbacks) on the bench's images; steps/s from the step hooks, after `s.warmup` steps."""
    from dreambench.train import train
    run_dir = Path(tempfile.mkdtemp(prefix=f"db-{tag}-", dir=s.work))
    # One untimed step after the window: the last step of a run also reads its final losses and flags for
    # metrics.json (end-of-run work, like the export); the window measures the steady state.
    cfg = compose([*model, *train_overrides(s.work, run_dir, s.warmup + s.steps + 1, extra)])
    counter = SyncCounter() if sync_count else None
    cuda_debug = sync_count and s.cuda
    from dreambench import speed
    reads = {}
    with StepClock(sync=s.cuda and not sync_count, cpu_from=s.warmup, cpu_to=s.warmup + s.steps) as clock, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if counter is not None:  # count over the timed steps only
            def start():
                reads["start"] = speed.HOST_READS[0]
                counter.__enter__()
                if cuda_debug:  # every synchronising CUDA call warns, blocking host<->device copies included
                    torch.cuda.set_sync_debug_mode("warn")

            def stop():
                if cuda_debug:
                    torch.cuda.set_sync_debug_mode(0)
                counter.__exit__(None, None, None)
                # dreambench's own reads (.tolist() of stacked values) dispatch no _local_scalar_dense: add them
                n = speed.HOST_READS[0] - reads["start"]
                counter.count += n
                if n:
                    counter.where["speed.read_back (losses + numerics flags, logging steps)"] = n
            clock.at_step(s.warmup, start)
            clock.after_step(s.warmup + s.steps - 1, stop)
        if memory and s.cuda:
            clock.at_step(s.warmup, torch.cuda.reset_peak_memory_stats)
        metrics = train(cfg)
    out = {"steps_per_s": clock.steps_per_s(s.warmup), "steps_per_cpu_s": clock.steps_per_cpu_s(s.warmup),
           "memory_plan": metrics.get("memory_plan")}
    return _with_syncs_and_peak(out, s, counter, caught, cuda_debug, memory)


def reference_steps(s: Settings, model_ref: str, resolution: int, encode_every_step: bool, fused: bool | None,
                    precision: str = "32-true", sync_count: bool = False, memory: bool = False,
                    channels_last: bool = False) -> dict[str, Any]:
    from bench.reference_loop import ReferenceLoop
    from dreambench.models.loading import load_components
    comps = load_components(model_ref)
    device = "cuda" if s.cuda else "cpu"
    loop = ReferenceLoop(comps, sorted(s.instance_dir.glob("*.png")), sorted(s.class_dir.glob("*.png")),
                         instance_prompt="a sks dog", class_prompt="a dog", resolution=resolution, lr=5e-6,
                         fused=fused, device=device, precision=precision, encode_every_step=encode_every_step,
                         channels_last=channels_last)
    for _ in range(s.warmup):
        loop.step()
    if s.cuda:
        torch.cuda.synchronize()
        if memory:
            torch.cuda.reset_peak_memory_stats()
    counter = SyncCounter() if sync_count else contextlib.nullcontext()
    cuda_debug = sync_count and s.cuda
    with counter, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda_debug:
            torch.cuda.set_sync_debug_mode("warn")
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(s.steps):
            loop.step()
        if cuda_debug:
            torch.cuda.set_sync_debug_mode(0)
        if s.cuda:
            torch.cuda.synchronize()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
    out = {"steps_per_s": s.steps / dt, "steps_per_cpu_s": s.steps / dc}
    _with_syncs_and_peak(out, s, counter if sync_count else None, caught, cuda_debug, memory)
    del loop, comps
    return out


def interleaved(s: Settings, variants: dict[str, Any], reps: int) -> dict[str, list[dict[str, Any]]]:
    """Each variant `reps` times, round-robin, so that load on a shared machine hits all variants alike."""
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    for r in range(reps):
        for name, fn in variants.items():
            res = fn()
            results[name].append(res)
            s.log(f"  [{r + 1}/{reps}] {name}: {res['steps_per_s']:.2f} steps/s, "
                  f"{res['steps_per_cpu_s']:.2f} steps per CPU-second")
    return results


# ---- cases ------------------------------------------------------------------------------------------------------
def case_overhead(s: Settings, tiny_ref: str) -> list[dict[str, Any]]:
    """Framework overhead, tiny model, this machine's CPU (or GPU if present)."""
    tiny = ["model=tiny"]
    variants = {
        "reference loop, as used (VAE + text encoder every step, AdamW default)":
            lambda: reference_steps(s, tiny_ref, 32, True, None),
        "reference loop, equal work (cached latents + embeddings, AdamW fused=false)":
            lambda: reference_steps(s, tiny_ref, 32, False, False),
        "dreambench, as used (defaults: cached latents + embeddings, fused AdamW auto)":
            lambda: dreambench_steps(s, tiny, [], "default"),
        "dreambench, equal work (optimizer.fused=false)":
            lambda: dreambench_steps(s, tiny, ["optimizer.fused=false"], "equal"),
    }
    res = interleaved(s, variants, s.reps)
    names = list(variants)
    med = {k: stats([r["steps_per_s"] for r in v])["median"] for k, v in res.items()}
    rows = []
    what = "tiny SD (1.0 M UNet), 32 px, batch 1 + 1 prior, fp32"
    cpu = {k: stats([r["steps_per_cpu_s"] for r in v]) for k, v in res.items()}

    def paired(a, b):  # run i of a against run i of b (interleaved, so under the same load): median ratio
        return stats([x["steps_per_s"] / y["steps_per_s"] for x, y in zip(res[a], res[b])])["median"]
    for k in names:
        extra = {"steps_per_cpu_s": cpu[k]}
        for mine, theirs, label in ((names[2], names[0], "reference, as used"),
                                    (names[3], names[1], "reference, equal work")):
            if k == mine:
                extra["ratio_vs"] = {label: med[mine] / med[theirs]}
                extra["paired_ratio"] = paired(mine, theirs)
                extra["cpu_time_ratio"] = cpu[mine]["median"] / cpu[theirs]["median"]
        rows.append(row("framework overhead", k, "steps/s", [r["steps_per_s"] for r in res[k]], what, **extra))
    return rows


def case_switches(s: Settings, baseline: float | None) -> list[dict[str, Any]]:
    """What each speed switch does to dreambench's steps/s (tiny model; on a CPU most are GPU features)."""
    switches = {
        "optimizer.fused=true": ["optimizer.fused=true"],
        "optimizer.fused=false": ["optimizer.fused=false"],
        "model.channels_last=true": ["model.channels_last=true"],
        "trainer.precision=bf16-mixed": ["trainer.precision=bf16-mixed"],
        "model.gradient_checkpointing=true": ["model.gradient_checkpointing=true"],
        "model.attention=eager": ["model.attention=eager"],
    }
    if not s.quick:
        switches["model.compile=true"] = ["model.compile=true"]
    else:
        switches = dict(list(switches.items())[:1])
    variants = {k: (lambda extra=v, k=k: dreambench_steps(s, ["model=tiny"], extra, re.sub(r"\W", "", k)))
                for k, v in switches.items()}
    res = interleaved(s, variants, max(2, s.reps - 2))
    rows = []
    for k, v in res.items():
        vals = [r["steps_per_s"] for r in v]
        extra = {"ratio_vs": {"dreambench defaults": stats(vals)["median"] / baseline}} if baseline else {}
        extra["steps_per_cpu_s"] = stats([r["steps_per_cpu_s"] for r in v])
        rows.append(row("switches (tiny)", f"dreambench, {k}", "steps/s", vals,
                        "tiny SD, 32 px, 1 + 1; ratio against dreambench's defaults above", **extra))
    return rows


def case_syncs(s: Settings, tiny_ref: str) -> list[dict[str, Any]]:
    """Host-device synchronisations per step (`aten._local_scalar_dense` calls), counted on the timed steps."""
    sub = Settings(s.work, reps=1, warmup=2, steps=10, quick=s.quick, cuda=s.cuda, log=s.log)
    db = dreambench_steps(sub, ["model=tiny"], ["trainer.log_every_n_steps=5"], "sync", sync_count=True)
    ref = reference_steps(sub, tiny_ref, 32, True, None, sync_count=True)
    what = "aten._local_scalar_dense calls (.item(), bool(), float() on a tensor) per step, 10 steps, logging every 5"
    rows = [row("host syncs per step", "dreambench", "syncs/step", [db["syncs_per_step"]], what,
                sites=db["sync_sites"]),
            row("host syncs per step", "reference loop (diffusers example)", "syncs/step", [ref["syncs_per_step"]],
                what, sites=ref["sync_sites"])]
    cuda_what = "warnings of torch.cuda.set_sync_debug_mode('warn') per step (all synchronising CUDA calls)"
    for name, res in (("dreambench", db), ("reference loop (diffusers example)", ref)):
        rows.append(row("CUDA syncs per step", name, "syncs/step", [res["cuda_syncs_per_step"]], cuda_what)
                    if "cuda_syncs_per_step" in res else skipped("CUDA syncs per step", name, NO_CUDA, cuda_what))
    return rows


FIRST_STEP = re.compile(r"first training step .* \(at (\d{4}-\d\d-\d\dT[0-9:.]+Z)\)")


def _utc(stamp: str) -> float:
    """The unix time of an ISO 8601 UTC stamp as dreambench and the reference run log it ("...T05:33:38.262Z")."""
    from datetime import datetime
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def first_step_time(text: str) -> float | None:
    """The unix time of the trainer's first-step log line (dreambench.speed.FirstStepClock), or None."""
    m = FIRST_STEP.search(text)
    return _utc(m.group(1)) if m else None


def case_startup(s: Settings) -> list[dict[str, Any]]:
    """Seconds from `python -m dreambench.train ... model=tiny` to the first training step (a log line)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    times, total = [], []
    n = 1 if s.quick else 3
    for i in range(n + 1):  # the first run warms the tiny-model build and the OS file cache: not counted
        run_dir = Path(tempfile.mkdtemp(prefix="startup-", dir=s.work))
        cmd = [sys.executable, "-m", "dreambench.train", "model=tiny",
               *train_overrides(s.work, run_dir, 1, []), f"hydra.run.dir={run_dir}"]
        cmd = [c for c in cmd if not c.startswith("paths.run_dir=")]
        t0 = time.time()
        p = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        t_end = time.time()
        first = first_step_time(p.stdout + p.stderr)
        if p.returncode != 0 or first is None:
            raise RuntimeError(f"start-up run failed (exit {p.returncode}): {(p.stderr or p.stdout)[-2000:]}")
        if i > 0:
            times.append(first - t0)
            total.append(t_end - t0)
        s.log(f"  start-up run {i}: {first - t0:.2f} s to the first step")
    return [row("start-up", "python -m dreambench.train model=tiny (1 step)", "s to first step", times,
                "command start -> first training step (interpreter, imports, config, checks, model load, "
                "memory plan, latents)", whole_run_s=stats(total)["median"])]


LAST_STEP = re.compile(r"last training step ended .*?at (\d{4}-\d\d-\d\dT[0-9:.]+Z)")
REF_STAMP = re.compile(r"reference: (first training step|last training step ended) at (\d{4}-\d\d-\d\dT[0-9:.]+Z)")


def case_whole_run(s: Settings, tiny_ref: str) -> list[dict[str, Any]]:
    """A whole tiny run from the command to the exit, dreambench (`python -m dreambench.train`) against the
    reference whole run (bench/reference_run.py: diffusers' train_dreambooth.py without Accelerate): 300 steps,
    batch 1 + 1, 5 instance and 16 class images already on disk, one thread each, interleaved. Each run's command
    -> first step, first -> last step, last step -> exit, from the runs' own UTC log stamps. The uncounted first
    round fills dreambench's content caches (class latents, the step-0 grid) as a researcher's first run of a
    setting does; "first time" turns the grid cache off to show that first run."""
    steps = 20 if s.quick else 300
    n = 1 if s.quick else max(3, s.reps - 2)
    inst = synthetic_images(s.work / "whole" / "instance", 5, 64, seed=3)
    cls = synthetic_images(s.work / "whole" / "class", 16, 64, seed=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    common = ["model=tiny", f"data.instance_dir={inst}", "data.subject=bench", "data.class_noun=dog",
              "data.live=false", "prior=folder", f"prior.folder={cls}", "logger=csv", "threads=1",
              f"trainer.max_steps={steps}", "train.checkpoint_every_n_steps=0"]

    def dreambench(extra: list[str]):
        def go(run_dir: Path) -> list[str]:
            return [sys.executable, "-m", "dreambench.train", *common, *extra, f"hydra.run.dir={run_dir}"]
        return go

    def reference(run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "bench.reference_run", "--model", tiny_ref, "--instance-dir", str(inst),
                "--class-dir", str(cls), "--out", str(run_dir / "model"), "--steps", str(steps)]
    variants = {"reference whole run (diffusers' train_dreambooth.py, no Accelerate)": reference,
                "dreambench, as used, again (grids at step 0 and the end, export; step-0 grid kept from before)":
                    dreambench([]),
                "dreambench, as used, first time (the step-0 grid sampled: train.sample_cache_dir=null)":
                    dreambench(["train.sample_cache_dir=null"]),
                "dreambench, train.samples=false (no grids; export)": dreambench(["train.samples=false"])}
    results: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    for r in range(n + 1):  # the first round warms the file cache and the tiny model: not counted
        for name, cmd in variants.items():
            run_dir = Path(tempfile.mkdtemp(prefix="whole-", dir=s.work))
            t0 = time.time()
            p = subprocess.run(cmd(run_dir), check=False, cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=1800)
            t_end = time.time()
            text = p.stdout + p.stderr
            if name.startswith("reference"):
                marks = {w: _utc(t) for w, t in REF_STAMP.findall(text)}
                first, last = marks.get("first training step"), marks.get("last training step ended")
            else:
                first, m = first_step_time(text), LAST_STEP.search(text)
                last = _utc(m.group(1)) if m else None
            if p.returncode != 0 or first is None or last is None:
                raise RuntimeError(f"{name} failed (exit {p.returncode}): {text[-2000:]}")
            if r > 0:
                results[name].append({"total": t_end - t0, "first": first - t0, "steps": last - first,
                                      "exit": t_end - last})
            s.log(f"  [{r}/{n}] {name}: {t_end - t0:.1f} s (first step {first - t0:.1f} s, exit {t_end - last:.1f} s)")
    ref = results[next(iter(variants))]
    rows = []
    for name, runs in results.items():
        ratio = stats([a["total"] / b["total"] for a, b in zip(runs, ref)])["median"]
        rows.append(row("whole run", name, "s", [x["total"] for x in runs],
                        f"{steps} steps, tiny model, 1 + 1, 16 class images on disk, one thread, command -> exit",
                        first_step_s=stats([x["first"] for x in runs])["median"],
                        steps_s=stats([x["steps"] for x in runs])["median"],
                        exit_s=stats([x["exit"] for x in runs])["median"],
                        ratio_vs_reference=None if runs is ref else ratio))
    return rows


def case_class_images(s: Settings, tiny_ref: str) -> list[dict[str, Any]]:
    """Class-image generation as dreambench does it (its pipeline from in-memory components, DDIM, CFG 7.5)."""
    from dreambench.models.loading import load_components
    from dreambench.sampling import build_pipeline, generate, make_scheduler
    rows = []
    steps = 50
    guidance = {"num_inference_steps": steps, "guidance_scale": 7.5, "negative_prompt": ""}
    setups = [("tiny", tiny_ref, 32, [1, 4] if s.quick else [1, 4, 8])]
    if s.cuda:
        setups.append(("sd15-random", str(sd15_random_folder(s)), 512, [1, 4, 8]))
    else:
        rows.append(skipped("class images", "SD 1.5 (random weights), 512², bf16 autocast", NO_CUDA))
    for name, ref, res, batches in setups:
        c = load_components(ref)
        device = "cuda" if s.cuda else "cpu"
        pipe = build_pipeline(c.unet.to(device), c.vae.to(device), c.text_encoder.to(device), c.tokenizer,
                              make_scheduler("DDIMScheduler", c.scheduler_config))
        g = dict(guidance, height=res, width=res)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if s.cuda else contextlib.nullcontext()
        for b in batches:
            with amp:
                generate(pipe, ["a dog"] * b, list(range(b)), dict(g, num_inference_steps=2), batch_size=b,
                         progress=False)  # warm-up
            vals = []
            for r in range(max(2, s.reps - 2)):
                if s.cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with amp:
                    generate(pipe, ["a dog"] * b, list(range(b)), g, batch_size=b, progress=False)
                if s.cuda:
                    torch.cuda.synchronize()
                vals.append(b / (time.perf_counter() - t0))
            rows.append(row("class images", f"{name}, {res}², batch {b}", "images/s", vals,
                            f"{steps} DDIM steps, guidance 7.5 (2 UNet passes per step), decode included"))
            s.log(f"  class images {name} batch {b}: {stats(vals)['median']:.2f} images/s")
        del pipe, c
    return rows


def case_scoring(s: Settings) -> list[dict[str, Any]]:
    """Evaluation scoring throughput, measured by the evaluation engineer's bench/bench_scoring.py."""
    script = REPO / "bench" / "bench_scoring.py"
    if not script.is_file():  # hook: bench_scoring.py belongs to the evaluation area
        return [skipped("scoring", "DINO + CLIP image embeddings", "bench/bench_scoring.py not found")]
    n, reps = (8, 2) if s.quick else (32, 3)
    cmd = [sys.executable, str(script), "--images", str(n), "--repeats", str(reps), "--batch-size", "16",
           "--device", "cuda" if s.cuda else "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        return [skipped("scoring", "DINO + CLIP image embeddings", f"bench_scoring.py failed: {p.stderr[-300:]}")]
    data = json.loads(p.stdout[p.stdout.index("{"):])
    rows = []
    for key, label in (("tiny", "tiny test encoders"), ("vit_s16_plus_clip_b32_random",
                                                         "ViT-S/16 (DINO) + CLIP ViT-B/32, random weights")):
        if key in data:
            d = data[key]
            vals = [d["images"] / t for t in d.get("repeats_s", [d["median_s"]])]
            rows.append(row("scoring", label, "images/s", vals, data.get("what", ""), source="bench/bench_scoring.py"))
    return rows


# ---- full size, GPU only ------------------------------------------------------------------------------------------
def sd15_random_folder(s: Settings) -> Path:
    """Randomly initialised SD 1.5 (bench/architectures), saved once as a diffusers folder (safetensors) so
    dreambench and the reference load it through the same code as a real checkpoint."""
    folder = s.work / "sd15-random"
    if (folder / "model_index.json").is_file():
        return folder
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambench.models.tokenizer import build_tiny_tokenizer

    def cfg(name):
        return json.loads((ARCH / f"sd15_{name}.json").read_text())
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()  # token ids only feed the (random) text encoder: its vocabulary is moot
    text_cfg = cfg("text")
    text_cfg["vocab_size"] = max(text_cfg["vocab_size"], len(tokenizer))
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False)
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**cfg("vae")), text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)),
                                   tokenizer=tokenizer, unet=UNet2DConditionModel(**cfg("unet")), scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def case_full_size(s: Settings) -> list[dict[str, Any]]:
    what = "random SD 1.5, 512², 1 + 1 prior batch, bf16 autocast, fp32 master weights + AdamW"
    if not s.cuda:
        return [skipped("full size (GPU)", v, NO_CUDA, what) for v in
                ("reference loop, as used", "reference loop, equal work", "dreambench, as used",
                 "dreambench, channels_last + compile")]
    folder = str(sd15_random_folder(s))
    sd15 = ["model=sd15", f"model.pretrained={folder}", "trainer=gpu", "data.resolution=512"]
    sub = Settings(s.work, reps=max(2, s.reps - 2), warmup=s.warmup, steps=max(10, s.steps // 2), quick=s.quick,
                   cuda=True, log=s.log)
    variants = {
        "reference loop, as used": lambda: reference_steps(sub, folder, 512, True, None, "bf16-mixed", memory=True),
        "reference loop, equal work": lambda: reference_steps(sub, folder, 512, False, None, "bf16-mixed",
                                                              memory=True),
        "dreambench, as used": lambda: dreambench_steps(sub, sd15, [], "sd15", memory=True),
        "dreambench, channels_last": lambda: dreambench_steps(sub, sd15, ["model.channels_last=true"], "cl",
                                                              memory=True),
    }
    if not s.quick:
        variants["dreambench, channels_last + compile"] = lambda: dreambench_steps(
            sub, sd15, ["model.channels_last=true", "model.compile=true"], "compile", memory=True)
    res = interleaved(sub, variants, sub.reps)
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    rows = []
    ref_med = stats([r["steps_per_s"] for r in res["reference loop, as used"]])["median"]
    for k, v in res.items():
        sps = [r["steps_per_s"] for r in v]
        ms = [1000 / x for x in sps]
        med = stats(sps)["median"]
        extra = {"peak_allocated_gb": max(r.get("peak_gb", 0) for r in v),
                 "mfu": (SD15_STEP_FLOP * med / peak) if peak else None,
                 "speedup_vs_reference_as_used": med / ref_med}
        plan = next((r.get("memory_plan") for r in v if r.get("memory_plan")), None)
        if plan:
            extra["memory_plan_gb"] = plan.get("estimated_peak_gb")
        rows.append(row("full size (GPU)", k, "ms/step", ms, what, **extra))
    return rows


# ---- full size, the other families, GPU only -------------------------------------------------------------------
FAMILY_MODELS = {"SDXL": "sdxl", "SD 3.5 medium": "sd35", "FLUX.1-dev": "flux"}  # ARCHITECTURES key -> model=


def random_family_folder(folder: Path, configs: dict[str, dict[str, Any]], device: str, dtype: torch.dtype) -> Path:
    """A randomly initialised diffusers folder (safetensors) of the family `configs` describe, built on `device`
    in `dtype` (on a GPU in bf16, FLUX.1-dev's 17 B parameters take seconds; on a CPU in fp32, minutes) with the
    family's pipeline class, its released scheduler and the project's own tokenizers, so dreambench loads it
    through the same code as a real checkpoint."""
    if (folder / "model_index.json").is_file():
        return folder
    import diffusers

    from dreambench.memory import config_family, meta_modules
    from dreambench.models.families import get_family
    from dreambench.models.tiny import family_scheduler
    from dreambench.models.tokenizer import build_tiny_t5_tokenizer, build_tiny_tokenizer

    family = get_family(config_family(configs))
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        unet, text_encoders, vae = meta_modules(configs, device=device)
    finally:
        torch.set_default_dtype(default)
    def cast(m):  # stragglers made in fp32 on purpose (SD 3.5's sin-cos position table)
        return m if all(p.dtype == dtype for p in m.parameters()) else m.to(dtype)
    parts: dict[str, Any] = {family.denoiser: cast(unet), "vae": cast(vae), "scheduler": family_scheduler(family.name)}
    for name, te in text_encoders.items():
        parts[name] = cast(te)
        t5 = "d_model" in configs[name]  # token ids only feed random encoders: the vocabularies are moot
        parts[name.replace("text_encoder", "tokenizer")] = build_tiny_t5_tokenizer() if t5 else build_tiny_tokenizer()
    for name in (*family.text_encoders, *family.tokenizers):  # SD 3.5 without its T5
        parts.setdefault(name, None)
    pipe = getattr(diffusers, family.pipeline_class)(**parts, **family.pipeline_init_kwargs)
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe, parts, unet, vae, text_encoders
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def family_rungs(configs: dict[str, dict[str, Any]], lora: bool, resolution: int, tokens: int, precision: str,
                 capacity: int | None, device: str) -> list[tuple[str, tuple[str, ...], Any]]:
    """The planner's switch ladder for full fine-tuning (lora=False) or LoRA, without the 8-bit rungs where
    bitsandbytes is not installed (`make install` leaves it out: it needs CUDA)."""
    import importlib.util

    from dreambench.memory import SWITCH_LADDER, switch_ladder
    from dreambench.methods import DreamBooth
    have_8bit = importlib.util.find_spec("bitsandbytes") is not None
    rungs = tuple(r for r in SWITCH_LADDER if ("lora" == r[2].get("method")) == lora and r[0] != "as configured"
                  and (have_8bit or "optimizer" not in r[2]))
    if not lora:
        rungs = (SWITCH_LADDER[0], *rungs)
    mixed = "mixed" in precision
    return switch_ladder(configs, DreamBooth(), rungs=rungs, resolution=resolution, precision=precision,
                         frozen_dtype=torch.bfloat16 if mixed else None, device=device, capacity=capacity,
                         max_sequence_length=tokens)


def case_families(s: Settings, archs: dict[str, tuple[int, int, dict[str, dict[str, Any]]]] | None = None
                  ) -> list[dict[str, Any]]:
    """SDXL, SD 3.5 medium and FLUX.1-dev at 1024², random full-size weights (bench/architectures), 1 + 1 prior
    batch, bf16 autocast with the frozen parts in bf16: full fine-tuning and LoRA, each with the first rung of the
    planner's switch ladder that fits the card (the planner's promise, checked: the measured peak is reported
    beside its estimate), or a row saying it fits no rung. `archs` replaces the full-size configs, by the keys of
    FAMILY_MODELS (the suite runs this on the tiny families' configs, on a CPU, fp32, capacity unchecked)."""
    models = FAMILY_MODELS
    what = "random weights, 1 + 1 prior batch, bf16 autocast, frozen parts bf16; first rung of the planner's ladder that fits"
    if archs is None and not s.cuda:
        return [skipped("families (GPU)", f"{m}, {kind}", NO_CUDA, what) for m in models for kind in ("full", "LoRA")]
    if archs is None:
        archs = {m: (res, tokens, {k: json.loads((ARCH / f"{n}.json").read_text()) for k, n in files.items()})
                 for m, (res, tokens, files) in ARCHITECTURES.items() if m in models}
    from dreambench.utils.io import safe_rmtree
    device = "cuda" if s.cuda else "cpu"
    precision = "bf16-mixed" if s.cuda else "32-true"
    capacity = int(torch.cuda.get_device_properties(0).total_memory) if s.cuda else None
    sub = Settings(s.work, reps=1, warmup=s.warmup if s.cuda else 1, steps=max(5, s.steps // 4) if s.cuda else 2,
                   quick=True, cuda=s.cuda, log=s.log)
    rows = []
    for model, (res, tokens, configs) in archs.items():
        folder = random_family_folder(s.work / f"random-{models[model]}", configs, device,
                                      torch.bfloat16 if s.cuda else torch.float32)
        try:
            for kind in ("full", "LoRA"):
                variant = f"{model}, {res}², {kind}"
                ladder = family_rungs(configs, kind == "LoRA", res, tokens, precision, capacity, device)
                fit = next(((label, ov, e) for label, ov, e in ladder if e.fits), None)
                if fit is None:
                    best = min(ladder, key=lambda r: r[2].total)
                    rows.append(skipped("families (GPU)", variant, f"fits no rung on this card: {best[0]} needs "
                                        f"~{best[2].total / 1e9:.1f} GB (trainer=fsdp: issue 15)", what))
                    continue
                label, overrides, est = fit
                s.log(f"  families {variant}: {label} (planned ~{est.total / 1e9:.1f} GB)")
                t5 = any("d_model" in c for c in configs.values())
                over = [f"model={models[model]}", f"model.pretrained={folder}", f"data.resolution={res}",
                        *([f"model.max_sequence_length={tokens}"] if t5 else []),
                        *(["trainer=gpu"] if s.cuda else []), *overrides]
                r = dreambench_steps(sub, over, [], models[model], memory=True)
                ms = 1000 / r["steps_per_s"]
                plan = (r.get("memory_plan") or {}).get("estimated_peak_gb")
                rows.append(row("families (GPU)", variant, "ms/step", [ms], what, switches=label,
                                overrides=" ".join(overrides), memory_plan_gb=plan,
                                peak_allocated_gb=r.get("peak_gb")))
        finally:
            safe_rmtree(folder, s.work)  # FLUX.1-dev is 34 GB on disk: one model at a time
    return rows


ARCHITECTURES = {  # bench/architectures: full-size configs, by diffusers component name; (px, T5 tokens, files)
    "SD 1.5": (512, 77, {"unet": "sd15_unet", "text_encoder": "sd15_text", "vae": "sd15_vae"}),
    "SDXL": (1024, 77, {"unet": "sdxl_unet", "text_encoder": "sdxl_text1", "text_encoder_2": "sdxl_text2",
                        "vae": "sdxl_vae"}),
    "SD 3.5 medium": (1024, 256, {"transformer": "sd35m_transformer", "text_encoder": "clip_l_proj_text",
                                  "text_encoder_2": "sdxl_text2", "text_encoder_3": "t5xxl_encoder",
                                  "vae": "sd35_vae"}),
    "SD 3.5 large": (1024, 256, {"transformer": "sd35l_transformer", "text_encoder": "clip_l_proj_text",
                                 "text_encoder_2": "sdxl_text2", "text_encoder_3": "t5xxl_encoder", "vae": "sd35_vae"}),
    "FLUX.1-dev": (1024, 512, {"transformer": "flux_dev_transformer", "text_encoder": "sd15_text",
                               "text_encoder_2": "t5xxl_encoder", "vae": "flux_vae"}),
}


def case_memory_plan() -> list[dict[str, Any]]:
    """The planner's estimates (no GPU needed: meta-device traces) for full-size SD 1.5 at 512², SDXL, SD 3.5 and
    FLUX.1-dev at 1024²,
    1 + 1 prior batch, bf16-mixed, frozen parts in bf16, DreamBooth with each rung of the switch ladder, and
    which of a 24 / 48 / 80 GB card each fits (README: which model, which card)."""
    from dreambench.memory import CARDS_GB, GB, switch_ladder
    from dreambench.methods import DreamBooth
    rows = []
    for model, (res, tokens, files) in ARCHITECTURES.items():
        configs = {k: json.loads((ARCH / f"{n}.json").read_text()) for k, n in files.items()}
        t0 = time.perf_counter()
        ladder = switch_ladder(configs, DreamBooth(), resolution=res, precision="bf16-mixed",
                               frozen_dtype=torch.bfloat16, device="cuda", max_sequence_length=tokens)
        plan_s = (time.perf_counter() - t0) / len(ladder)
        for label, overrides, e in ladder:
            rows.append({"case": f"memory plan ({model}, {res}², 1 + 1)", "variant": label, "unit": "GB (estimate)",
                         "what": "dreambench.memory.estimate; CUDA overhead 1 GB included", "median": e.total / GB,
                         "n": 1, "overrides": " ".join(overrides), "parts_gb": e.summary()["parts_gb"],
                         "fits_gb": [c for c in CARDS_GB if e.total <= c * GB], "plan_s": plan_s})
    return rows
