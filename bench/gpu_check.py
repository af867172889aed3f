"""`make gpu-check`: everything a GPU session should measure, in one prepared call with a time budget.

    python -m bench.gpu_check [--budget-s 480] [--out bench/results] [--steps 100]

On one CUDA device (H100/H200 in mind; random full-size weights, nothing downloaded):
  sd15_step      SD 1.5, 512², batch 1 + 1 prior, bf16 autocast: ms/step, MFU against the step's counted FLOPs,
                 peak memory beside the planner's estimate, and the reference loop side by side (bench.cases)
  families       SDXL, SD 3.5 medium and FLUX.1-dev at 1024², random full-size weights built on the GPU in bf16:
                 full fine-tuning and LoRA, each with the first rung of the planner's switch ladder that fits
                 the card: ms/step, peak memory beside the planner's estimate (bench.cases.case_families; last,
                 ~5 min: run it alone with --cases families when the budget does not reach it)
  class_images   SD 1.5 class images/s at 512² (50 DDIM steps, guidance 7.5) per batch size, and the best batch
  eval_images    scoring images/s (DINO ViT-S/16 + CLIP ViT-B/32, random weights) per batch size, and the best
  syncs          host syncs and synchronising CUDA calls per training step
  end_to_end     train (--steps, bf16) -> export -> generate -> evaluate on random full-size SD 1.5, with
                 model.compile off and on: each stage's wall time, and that each finished without error
  fsdp           with two or more GPUs: trainer=fsdp on all of them, SD 1.5 fully fine-tuned (--steps), its
                 state sharded, a full checkpoint and the export: wall time, and that it finished

On a CPU the GPU cases are reported as skipped, and end_to_end runs the same chain (same commands, same code)
on the tiny model and tiny encoders with 3 steps, so the suite checks the script itself.

The budget is enforced: a case whose estimate no longer fits is not started, a running case is interrupted at
the deadline (less a reserve for writing the report), and the report lists what was not reached and why.
Writes bench/results/gpu-<time>.json and .md and prints a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import REPO, machine, stats, synthetic_images, write_results

RESERVE_S = 15.0  # kept back from the budget for writing the report
SUBJECT, CLASS_NOUN = "bench", "dog"
PROMPTS = ("a {0} {1} in the jungle", "a {0} {1} on the beach", "a red {0} {1}")


class BudgetExceeded(Exception):
    pass


@dataclass
class Deadline:
    end: float  # time.monotonic() at which the report must be written

    @property
    def left(self) -> float:
        return self.end - time.monotonic()

    @contextlib.contextmanager
    def interrupt_at_end(self):
        """Raise BudgetExceeded in the main thread when the deadline passes inside the block (SIGALRM)."""
        if not hasattr(signal, "setitimer"):
            yield
            return

        def fire(signum, frame):
            raise BudgetExceeded(f"interrupted at the deadline ({self.end - time.monotonic():+.0f} s)")
        old = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, max(self.left, 0.01))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


@dataclass
class Case:
    name: str
    estimate_s: float  # on the device it will run on; a case is started only if this much time is left
    run: Callable[[], list[dict[str, Any]]]


def synthetic_dreambench(root: Path, size: int = 512) -> Path:
    """A DreamBench-layout data set (prompts_and_classes.txt, one subject folder) of synthetic photos: what
    `dreambench.train` and `dreambench.evaluate` read, with nothing to download."""
    from dreambench.world.world import index_text
    synthetic_images(root / SUBJECT, 4, size, seed=0)
    (root / "prompts_and_classes.txt").write_text(index_text({SUBJECT: CLASS_NOUN}, PROMPTS))
    return root


def random_encoders(folder: Path) -> tuple[Path, Path]:
    """DINO ViT-S/16 and CLIP ViT-B/32 with random weights, saved as local checkpoints the evaluation loads
    like the hub's (same classes, same from_pretrained)."""
    from dreambench.metrics.encoders import _clip_image_processor_cls, random_clip_b32, random_vit_s16
    from dreambench.models.tokenizer import build_tiny_tokenizer
    dino, clip = folder / "dino", folder / "clip"
    if not (dino / "config.json").is_file():
        random_vit_s16().save_pretrained(dino, safe_serialization=True)
    if not (clip / "config.json").is_file():
        random_clip_b32().save_pretrained(clip, safe_serialization=True)
        build_tiny_tokenizer(str(clip))
        _clip_image_processor_cls()().save_pretrained(clip)
    return dino, clip


def _stage(name: str, cmd: list[str], deadline: Deadline, log: Callable[[str], None], cwd: Path) -> dict[str, Any]:
    """One command of the end-to-end chain, its wall time and its last lines when it fails."""
    left = deadline.left
    if left < 5:
        return {"stage": name, "status": "not reached: budget", "seconds": None}
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=left, check=False)
    except subprocess.TimeoutExpired:
        return {"stage": name, "status": "stopped: budget", "seconds": round(time.perf_counter() - t0, 1)}
    dt = round(time.perf_counter() - t0, 1)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        log(f"  end_to_end {name}: FAILED (exit {p.returncode}): {' | '.join(tail)}")
        return {"stage": name, "status": f"failed (exit {p.returncode})", "seconds": dt, "error": "\n".join(tail)}
    log(f"  end_to_end {name}: {dt:.1f} s")
    return {"stage": name, "status": "ok", "seconds": dt}


def end_to_end(work: Path, cuda: bool, steps: int, compile_: bool, deadline: Deadline,
               log: Callable[[str], None]) -> dict[str, Any]:
    """train -> export -> generate -> evaluate, each as a user runs it (python -m ...), in one run folder."""
    from bench.cases import Settings, sd15_random_folder
    data = synthetic_dreambench(work / "data", 512 if cuda else 64)
    py = sys.executable
    run = work / f"e2e-compile-{'on' if compile_ else 'off'}"
    if cuda:
        model = ["model=sd15", f"model.pretrained={sd15_random_folder(Settings(work, cuda=True))}", "trainer=gpu",
                 "data.resolution=512", f"model.compile={str(compile_).lower()}"]
        dino, clip = random_encoders(work / "encoders")
        metrics = [f"metrics.dino.name_or_path={dino}", f"metrics.clip.name_or_path={clip}", "metrics.device=cuda",
                   "metrics.batch_size=64"]
        sampling = 25
    else:  # the same chain on the tiny model: what the CPU suite checks
        model = ["model=tiny", f"model.compile={str(compile_).lower()}"]
        metrics = ["metrics=tiny"]
        sampling = 4
    train = [py, "-m", "dreambench.train", *model, f"paths.dataset_dir={data}", f"data.subject={SUBJECT}",
             f"data.class_noun={CLASS_NOUN}", "data.live=false", "prior.num_images=8",
             f"guidance.num_inference_steps={sampling}", f"trainer.max_steps={steps}", "logger=csv",
             "train.samples=false", "train.checkpoint_every_n_steps=0", "train.export=[diffusers,single_file]",
             "progress=false", f"paths.cache_dir={work / 'cache'}", f"hydra.run.dir={run}"]
    generate = [py, "-m", "dreambench.generate", f"run={run}", "num_images=2", f"out={run / 'generated'}",
                f"guidance.num_inference_steps={sampling}", "progress=false"]
    evaluate = [py, "-m", "dreambench.evaluate", "mode=run", f"runs=[{run}]", f"paths.dataset_dir={data}",
                *metrics, "eval.prompts_limit=2", "eval.images_per_prompt=2", "eval.pres_images=2",
                f"eval.num_inference_steps={sampling}", "eval.progress=false"]
    stages = []
    for name, cmd in (("train + export", train), ("generate", generate), ("evaluate", evaluate)):
        if stages and stages[-1]["status"] != "ok":
            stages.append({"stage": name, "status": "not reached: an earlier stage did not finish", "seconds": None})
            continue
        stages.append(_stage(name, cmd, deadline, log, REPO))
    exported = sorted(str(p.relative_to(run)) for p in (run / "export").rglob("*.safetensors"))
    scores = {}
    with contextlib.suppress(OSError, ValueError, KeyError):
        m = json.loads((run / "eval" / "metrics.json").read_text())["metrics"]
        scores = {k: v["mean"] for k, v in m.items() if isinstance(v, dict) and "mean" in v}
    ok = all(s["status"] == "ok" for s in stages)
    return {"case": "end to end", "variant": f"{'SD 1.5 random, 512², bf16' if cuda else 'tiny model, CPU'}, "
            f"{steps} steps, compile {'on' if compile_ else 'off'}", "unit": "s", "status": "ok" if ok else "failed",
            "stages": stages, "exported": exported, "scores": scores,
            "what": "train + export (diffusers, single file) -> generate -> evaluate (2 prompts x 2 images, PRES 2)",
            **(stats([sum(s["seconds"] for s in stages)]) if ok else {})}


def fsdp_run(work: Path, gpus: int, steps: int, deadline: Deadline, log: Callable[[str], None]) -> list[dict]:
    """trainer=fsdp on every GPU: SD 1.5 (random full-size weights) fully fine-tuned with its trained state sharded
    across the cards, a full checkpoint at the end, the export gathered to rank 0."""
    from bench.cases import Settings, sd15_random_folder
    data = synthetic_dreambench(work / "data", 512)
    run = work / "fsdp"
    cmd = [sys.executable, "-m", "dreambench.train", "model=sd15",
           f"model.pretrained={sd15_random_folder(Settings(work, cuda=True))}", "trainer=fsdp",
           f"trainer.devices={gpus}", "trainer.accelerator=gpu", "trainer.precision=bf16-mixed", "data.resolution=512",
           f"paths.dataset_dir={data}", f"data.subject={SUBJECT}", f"data.class_noun={CLASS_NOUN}", "data.live=false",
           "prior.num_images=8", f"trainer.max_steps={steps}", f"train.checkpoint_every_n_steps={steps}",
           "logger=csv", "train.samples=false", "progress=false", f"paths.cache_dir={work / 'cache'}",
           f"hydra.run.dir={run}"]
    stage = _stage("train + checkpoint + export", cmd, deadline, log, REPO)
    ok = stage["status"] == "ok"
    return [{"case": "fsdp", "variant": f"SD 1.5 random, 512², bf16, trainer=fsdp on {gpus} GPUs, {steps} steps",
             "unit": "s", "status": "ok" if ok else stage["status"], "stages": [stage],
             "what": "a full fine-tune sharded across the GPUs (dreambench/parallel.py), checkpoint and export",
             **(stats([stage["seconds"]]) if ok else {})}]


def _best_batch(case: str, variant: str, unit: str, per_batch: dict[int, list[float]], what: str) -> list[dict]:
    from bench.cases import row
    rows = [row(case, f"{variant}, batch {b}", unit, v, what) for b, v in per_batch.items()]
    best = max(per_batch, key=lambda b: stats(per_batch[b])["median"])
    rows.append(row(case, f"{variant}, best batch ({best})", unit, per_batch[best], what, best_batch=best))
    return rows


def class_images(work: Path, log) -> list[dict[str, Any]]:
    """Class images/s at 512² on random SD 1.5, bf16 autocast, for growing batch sizes (the best one kept)."""
    from bench.cases import Settings, sd15_random_folder
    from dreambench.models.loading import load_components
    from dreambench.sampling import build_pipeline, generate, make_scheduler
    c = load_components(str(sd15_random_folder(Settings(work, cuda=True))))
    pipe = build_pipeline(c.unet.cuda(), c.vae.cuda(), c.text_encoder.cuda(), c.tokenizer,
                          make_scheduler("DDIMScheduler", c.scheduler_config))
    g = {"num_inference_steps": 50, "guidance_scale": 7.5, "negative_prompt": "", "height": 512, "width": 512}
    per: dict[int, list[float]] = {}
    for b in (1, 4, 8, 16):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            generate(pipe, ["a dog"] * b, list(range(b)), dict(g, num_inference_steps=2), batch_size=b,
                     progress=False)
            vals = []
            for _ in range(2):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                generate(pipe, ["a dog"] * b, list(range(b)), g, batch_size=b, progress=False)
                torch.cuda.synchronize()
                vals.append(b / (time.perf_counter() - t0))
        per[b] = vals
        log(f"  class images batch {b}: {stats(vals)['median']:.2f} images/s")
    return _best_batch("class images", "SD 1.5 (random), 512², bf16", "images/s", per,
                       "50 DDIM steps, guidance 7.5, decode included (what prior=generated does)")


def eval_images(work: Path, log) -> list[dict[str, Any]]:
    """Scoring images/s: DINO ViT-S/16 + CLIP ViT-B/32 image embeddings of 512² images, per batch size."""
    from bench.bench_scoring import images
    from dreambench.metrics.encoders import ClipEncoder, DinoEncoder
    from dreambench.metrics.scorer import Scorer
    dino, clip = random_encoders(work / "encoders")
    ims = images(256, 512)
    per: dict[int, list[float]] = {}
    for b in (16, 32, 64, 128):
        scorer = Scorer(DinoEncoder(str(dino), batch_size=b, device="cuda"),
                        ClipEncoder(str(clip), batch_size=b, device="cuda"))
        scorer.embed(ims[:b])
        vals = []
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            scorer.embed(ims)
            torch.cuda.synchronize()
            vals.append(len(ims) / (time.perf_counter() - t0))
        per[b] = vals
        log(f"  evaluation scoring batch {b}: {stats(vals)['median']:.1f} images/s")
    return _best_batch("evaluation images", "DINO ViT-S/16 + CLIP ViT-B/32 (random), 512²", "images/s", per,
                       "image embeddings incl. preprocessing; generation is the class-images figure")


def cases(work: Path, cuda: bool, steps: int, deadline: Deadline, log) -> list[Case]:
    from bench import cases as bc
    from bench.cases import NO_CUDA, Settings, skipped

    # quick: the step case leaves out its compile variant (the end-to-end run times compile on and off instead)
    s = Settings(work, reps=2, warmup=5, steps=20, quick=True, cuda=cuda, log=log)

    import torch
    gpus = torch.cuda.device_count() if cuda else 0

    def gpu_only(case: str, variant: str, fn: Callable[[], list[dict]]) -> Callable[[], list[dict]]:
        return fn if cuda else (lambda: [skipped(case, variant, NO_CUDA)])

    def tiny_ref() -> str:
        from omegaconf import OmegaConf

        from dreambench.models.tiny import ensure_tiny_model
        return str(ensure_tiny_model(OmegaConf.select(bc.compose(["model=tiny"]), "model.pretrained")))

    def e2e() -> list[dict]:
        rows = [end_to_end(work, cuda, steps if cuda else 3, False, deadline, log)]
        if cuda:
            rows.append(end_to_end(work, cuda, steps, True, deadline, log))
        else:
            rows.append(skipped("end to end", "compile on", "skipped: no CUDA device (compile is timed on the GPU)"))
        return rows

    # Most important first: if the budget runs out, what is left undone matters least.
    return [
        Case("sd15_step", 150 if cuda else 0, gpu_only("full size (GPU)", "SD 1.5, 512², 1 + 1, bf16",
                                                        lambda: (bc.prepare_work(s), bc.case_full_size(s))[1])),
        Case("end_to_end", 200 if cuda else 60, e2e),
        Case("syncs", 30, lambda: (bc.prepare_work(s), bc.case_syncs(s, tiny_ref()))[1]),
        Case("class_images", 90 if cuda else 0, gpu_only("class images", "SD 1.5 (random), 512², bf16",
                                                         lambda: class_images(work, log))),
        Case("eval_images", 40 if cuda else 0, gpu_only("evaluation images", "DINO + CLIP (random), 512²",
                                                        lambda: eval_images(work, log))),
        Case("families", 300 if cuda else 0, gpu_only("families (GPU)", "SDXL, SD 3.5 medium, FLUX.1-dev, 1024²",
                                                      lambda: (bc.prepare_work(s), bc.case_families(s))[1])),
        Case("fsdp", 120 if gpus > 1 else 0, (lambda: fsdp_run(work, gpus, steps, deadline, log)) if gpus > 1 else (
            lambda: [skipped("fsdp", "trainer=fsdp on every GPU", "skipped: fewer than two CUDA devices (the suite "
                             "runs trainer=fsdp on two CPU processes: tests/test_fsdp.py)")])),
    ]


def markdown(result: dict[str, Any]) -> str:
    from bench.run import markdown as bench_markdown
    md = bench_markdown({**result, "rows": [r for r in result["rows"] if r.get("case") != "end to end"]})
    md = md.replace("# dreambench benchmark", "# dreambench GPU check", 1)
    lines = [md.rstrip(), "", "## End to end", "", "| variant | status | stages (s) | exported | scores |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        if r.get("case") != "end to end":
            continue
        if r.get("skipped"):
            lines.append(f"| {r['variant']} | {r['skipped']} | | | |")
            continue
        st = ", ".join(f"{s['stage']} {s['seconds'] if s['seconds'] is not None else '–'}"
                       + ("" if s["status"] == "ok" else f" ({s['status']})") for s in r["stages"])
        sc = ", ".join(f"{k} {v:.3f}" for k, v in r["scores"].items())
        lines.append(f"| {r['variant']} | {r['status']} | {st} | {', '.join(r['exported'])} | {sc} |")
    lines += ["", f"Budget {result['budget_s']:.0f} s, used {result['elapsed_s']:.0f} s. Not reached: "
              + ("; ".join(f"{k} ({v})" for k, v in result["not_reached"].items()) or "nothing") + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    t_start = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole check (s)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--steps", type=int, default=100, help="training steps of the end-to-end run on a GPU")
    ap.add_argument("--cases", default=None, help="comma-separated subset (default: all)")
    a = ap.parse_args(argv)
    deadline = Deadline(t_start + a.budget_s - RESERVE_S)
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(1)  # as make bench on a CPU: comparable, steady figures

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=out))
    result: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "command": " ".join(["python -m bench.gpu_check", *(argv if argv is not None
                                                                                  else sys.argv[1:])]),
                              "machine": machine(), "budget_s": a.budget_s,
                              "settings": {"warmup": 5, "steps": 20, "e2e_steps": a.steps},
                              "rows": [], "cases": {}, "not_reached": {}}
    chosen = a.cases.split(",") if a.cases else None
    try:
        for case in cases(work, cuda, a.steps, deadline, log):
            if chosen is not None and case.name not in chosen:
                continue
            if deadline.left < case.estimate_s or deadline.left <= 0:
                why = f"budget: ~{case.estimate_s:.0f} s needed, {max(deadline.left, 0):.0f} s left"
                result["not_reached"][case.name] = why
                result["cases"][case.name] = "not reached"
                log(f"[gpu-check] {case.name}: not reached ({why})")
                continue
            t0 = time.monotonic()
            log(f"[gpu-check] {case.name} ...")
            try:
                with deadline.interrupt_at_end():
                    rows = case.run()
                status = "ok"
            except BudgetExceeded as e:
                rows, status = [], "stopped: budget"
                result["not_reached"][case.name] = f"stopped at the deadline after {time.monotonic() - t0:.0f} s ({e})"
            except Exception as e:  # noqa: BLE001 -- a failing case is reported, the others still run
                rows, status = [], f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                result["not_reached"][case.name] = status
            if any(r.get("status") == "failed" for r in rows):
                status = "failed"
            result["rows"] += rows
            result["cases"][case.name] = status
            log(f"[gpu-check] {case.name}: {status} ({time.monotonic() - t0:.0f} s)")
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    path = write_results(out, "gpu", "gpu-latest", result, markdown(result))
    log(f"gpu-check: wrote {path} and .md ({result['elapsed_s']:.0f} s of {a.budget_s:.0f} s)")
    return result


if __name__ == "__main__":
    main()
