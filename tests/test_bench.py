"""The benchmark's own correctness (never its timings): the reference loop computes dreambench's loss, the speed
switches do what they claim, the hot path has no host sync, and a --quick driver run writes its files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import REPO, compose, torch_threads

sys.path.insert(0, str(REPO))  # `bench` is a top-level folder of the repository, not an installed package


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a small shared machine: OpenMP's spinning threads make 2-thread steps 10-20x slower
    # whenever the other test worker is busy; one thread per worker is faster and restored afterwards.
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from bench.common import synthetic_images
    root = tmp_path_factory.mktemp("bench-images")
    synthetic_images(root / "instance", 3, 64, seed=0)
    synthetic_images(root / "class", 3, 64, seed=1)
    return root


def overrides(images: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["model=tiny", f"data.instance_dir={images / 'instance'}", "data.subject=bench", "data.class_noun=dog",
            "data.live=false", "prior=folder", f"prior.folder={images / 'class'}", "logger=none",
            f"paths.run_dir={run_dir}", "progress=false", "trainer.max_steps=2", *extra]


def build(images: Path, run_dir: Path, *extra: str, setup: bool = True):
    """A DreamBoothModule as train() builds it, attached to a CPU Trainer, with setup() run (latents cached)."""
    from hydra.utils import instantiate

    from dreambench.models.loading import load_components
    from dreambench.module import DreamBoothModule
    from dreambench.train import prepare
    cfg = compose(overrides(images, run_dir, *extra))
    plan = prepare(cfg)
    comps = load_components(plan.model_ref)
    module = DreamBoothModule(comps, cfg, plan.instance_paths, plan.prior, "sks", instantiate(cfg.method))
    if setup:
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        module.trainer = trainer
        module.setup("fit")
    return module, cfg


def test_bench_modules_import():
    import bench.cases
    import bench.common
    import bench.reference_loop
    import bench.run
    assert set(bench.run.CASES) >= {"overhead", "startup", "full_size", "class_images", "scoring"}


def test_reference_loop_computes_dreambench_loss(images, tmp_path, monkeypatch):
    """Same weights, same latents, noise and timesteps: the reference's loss (written as diffusers' example
    writes it: torch.chunk, MSE + λ·prior MSE) equals dreambench's training_step loss. λ = 0.7 so that a
    dropped or misplaced weight shows; a wrong target, split or scale would too."""
    from bench.common import SyncCounter
    from bench.reference_loop import reference_loss
    from dreambench.data.latents import draw_indices
    module, cfg = build(images, tmp_path, "prior.weight=0.7")
    monkeypatch.setattr(module, "log", lambda *a, **k: None)  # no fit loop to log into here
    state = module.noise_generator.get_state()
    with SyncCounter() as syncs:
        loss = module.training_step(None, 0)
    # The same draws, in the order _draw/training_step make them, from the same generator state.
    g = torch.Generator().set_state(state)
    seed = int(cfg.seed)
    inst = module.instance_bank.sample(torch.tensor(draw_indices(len(module.instance_bank), seed, [0])), g)
    cls = module.class_bank.sample(torch.tensor(draw_indices(len(module.class_bank), seed + 1, [0])), g)
    latents = torch.cat([inst, cls])
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, module.noise_scheduler.config.num_train_timesteps, (2,), generator=g)
    cond = torch.cat([module.instance_emb["encoder_hidden_states"], module.class_emb["encoder_hidden_states"]])
    ref = reference_loss(module.unet, module.noise_scheduler, latents, noise, t, cond, 0.7)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    unweighted = reference_loss(module.unet, module.noise_scheduler, latents, noise, t, cond, 1.0)
    assert not torch.allclose(loss, unweighted)  # the check can tell λ apart
    # The step's forward + loss reads nothing back to the host (no .item()/bool() on a tensor).
    assert syncs.count == 0, syncs.where


def test_reference_loop_sees_the_same_latents(images, tmp_path):
    """The reference encodes the same pixels every step that dreambench caches once: same latent mean."""
    from bench.reference_loop import load_pixels
    from dreambench.data.latents import latent_scale
    module, _ = build(images, tmp_path)
    pixels = load_pixels(module.instance_paths, 32)
    with torch.no_grad():
        mean = module.vae.encode(pixels).latent_dist.mean * latent_scale(module.vae)
    torch.testing.assert_close(mean, module.instance_bank.mean, rtol=1e-5, atol=1e-5)


def test_reference_loop_steps_and_learns(images, tmp_path):
    from bench.reference_loop import ReferenceLoop
    from dreambench.models.loading import load_components
    module, _ = build(images, tmp_path, setup=False)
    comps = load_components(str(module.components.identity["ref"]))
    before = comps.unet.conv_in.weight.detach().clone()
    for encode in (True, False):
        loop = ReferenceLoop(comps, module.instance_paths, sorted((images / "class").glob("*.png")),
                             instance_prompt="a sks dog", class_prompt="a dog", resolution=32, lr=1e-3,
                             encode_every_step=encode)
        loop.step()
        loop.step()
        assert loop.step_count == 2 and loop.last_loss is not None and loop.last_loss > 0
    assert not torch.equal(before, comps.unet.conv_in.weight)


def test_channels_last_switch(images, tmp_path):
    plain, _ = build(images, tmp_path / "a", setup=False)
    nhwc, _ = build(images, tmp_path / "b", "model.channels_last=true", setup=False)
    w0, w1 = plain.unet.conv_in.weight, nhwc.unet.conv_in.weight
    assert not w0.is_contiguous(memory_format=torch.channels_last)
    assert w1.is_contiguous(memory_format=torch.channels_last)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in nhwc.unet.parameters() if p.ndim == 4)


def test_fused_adamw_switch(images, tmp_path):
    auto, _ = build(images, tmp_path / "a", setup=False)
    off, _ = build(images, tmp_path / "b", "optimizer.fused=false", setup=False)
    opt_auto = auto.configure_optimizers()["optimizer"]
    opt_off = off.configure_optimizers()["optimizer"]
    # optimizer.fused: null -> fused wherever torch has the kernel; torch >= 2.4 has it for CPU too.
    assert opt_auto.defaults["fused"] is True
    assert opt_off.defaults["fused"] is False


def test_fused_adamw_matches_the_reference_implementation_on_cpu():
    """Auto picks the fused CPU kernel: it must give the same updates as the plain AdamW."""
    torch.manual_seed(0)
    a = [torch.randn(64, 32, requires_grad=True), torch.randn(32, requires_grad=True)]
    b = [p.detach().clone().requires_grad_(True) for p in a]
    oa = torch.optim.AdamW(a, lr=1e-2, weight_decay=1e-2, fused=True)
    ob = torch.optim.AdamW(b, lr=1e-2, weight_decay=1e-2, foreach=False)
    for step in range(5):
        g = [torch.randn_like(p) for p in a]
        for p, q, gi in zip(a, b, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        oa.step()
        ob.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_compile_switch(images, tmp_path):
    module, _ = build(images, tmp_path, "model.compile=true")
    keys = set(module.unet.state_dict())
    assert module.unet._compiled_call_impl is not None  # nn.Module.compile: forward goes through torch.compile
    assert not any(k.startswith("_orig_mod") for k in keys)  # checkpoints and export keep their names
    plain, _ = build(images, tmp_path / "b", setup=False)
    assert plain.unet._compiled_call_impl is None


def test_frozen_dtype_casts_on_gpu_only_and_export_gets_exact_fp32():
    from types import SimpleNamespace

    from dreambench import speed
    from dreambench.memory import resolve_frozen_dtype
    assert resolve_frozen_dtype("auto", "bf16-mixed", on_gpu=False) is None
    assert resolve_frozen_dtype("auto", "32-true", on_gpu=True) is None
    assert resolve_frozen_dtype("auto", "bf16-mixed", on_gpu=True) is torch.bfloat16
    assert resolve_frozen_dtype("fp16", "32-true", on_gpu=False) is torch.float16
    with pytest.raises(ValueError):
        resolve_frozen_dtype("int8", "32-true", on_gpu=True)
    torch.manual_seed(0)
    m = SimpleNamespace(vae=torch.nn.Linear(8, 8).requires_grad_(False),
                        text_encoder=torch.nn.Linear(8, 8).requires_grad_(False))
    original = m.vae.weight.detach().clone()
    speed.cast_frozen(m, "auto", "bf16-mixed", torch.device("cpu"))
    assert m.vae.weight.dtype == torch.float32  # CPU: left alone
    speed.cast_frozen(m, "auto", "bf16-mixed", torch.device("cuda"))  # dtype only: nothing is moved
    assert m.vae.weight.dtype == torch.bfloat16 and m.text_encoder.weight.dtype == torch.bfloat16
    speed.restore_frozen(m)
    assert m.vae.weight.dtype == torch.float32
    assert torch.equal(m.vae.weight, original)  # the exact fp32 weights, not a bf16 round trip


@pytest.mark.slow
def test_quick_bench_run_writes_json_and_markdown(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--reps", "1", "--steps", "2", "--warmup", "1",
           "--cases", "overhead,full_size,memory_plan", "--out", str(tmp_path)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((tmp_path / "latest.json").read_text())
    md = (tmp_path / "latest.md").read_text()
    assert {"cpu", "cores", "torch", "device"} <= set(data["machine"])
    rows = data["rows"]
    timed = [r for r in rows if r["case"] == "framework overhead"]
    assert len(timed) == 4
    for r in timed:
        assert r["unit"] == "steps/s" and r["median"] > 0 and r["min"] <= r["median"] <= r["max"]
    assert any("ratio_vs" in r for r in timed)
    full = [r for r in rows if r["case"] == "full size (GPU)"]
    if not torch.cuda.is_available():
        assert full and all(r["skipped"] == "skipped: no CUDA device" for r in full)
        assert "skipped: no CUDA device" in md
    plan = [r for r in rows if r["case"].startswith("memory plan")]
    assert plan and all(r["median"] > 1 for r in plan)
    assert "| case | variant | median |" in md and "framework overhead" in md
    assert md in p.stdout  # the table is printed too


@pytest.mark.slow
def test_gpu_check_runs_on_a_cpu_with_its_gpu_cases_skipped_and_the_end_to_end_chain_on_the_tiny_model(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path), "--budget-s", "900"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((tmp_path / "gpu-latest.json").read_text())
    md = (tmp_path / "gpu-latest.md").read_text()
    assert data["cases"] == {"sd15_step": "ok", "end_to_end": "ok", "syncs": "ok", "class_images": "ok",
                             "eval_images": "ok", "families": "ok", "fsdp": "ok"} and data["not_reached"] == {}
    rows = data["rows"]
    for case in ("full size (GPU)", "class images", "evaluation images", "families (GPU)", "fsdp"):
        got = [r for r in rows if r["case"] == case]
        assert got and all(r.get("skipped") for r in got), case
    e2e = next(r for r in rows if r["case"] == "end to end" and not r.get("skipped"))
    assert e2e["status"] == "ok" and [s["stage"] for s in e2e["stages"]] == ["train + export", "generate", "evaluate"]
    assert {"dino", "clip_t"} <= set(e2e["scores"]) and any(x.endswith(".safetensors") for x in e2e["exported"])
    syncs = next(r for r in rows if r["case"] == "host syncs per step" and r["variant"] == "dreambench")
    assert syncs["median"] <= 0.2  # the hot path's guarantee (issue 15), read through the same script
    assert "## End to end" in md and "Not reached: nothing." in md and md in p.stdout


@pytest.mark.slow
def test_the_families_gpu_case_runs_its_own_code_on_the_tiny_families(tmp_path):
    # On a GPU the case builds random full-size SDXL / SD 3.5 / FLUX.1 folders in bf16 and trains each with the
    # first rung of the planner's ladder that fits the card. Here the same code builds folders from the tiny
    # families' configs and trains them on a CPU through model=sdxl / sd35 / flux, so a GPU session does not
    # find the case broken.
    from safetensors import safe_open

    from bench import cases as bc
    from dreambench.memory import read_configs
    from dreambench.models.tiny import ensure_tiny_model
    s = bc.Settings(tmp_path, reps=1, warmup=1, steps=2, quick=True, cuda=False, log=lambda m: None)
    skipped = bc.case_families(s)  # no CUDA, no configs given: every row says why it did not run
    assert len(skipped) == 6 and all(r["skipped"] == bc.NO_CUDA for r in skipped)

    archs = {}
    for key, model in (("SDXL", "model=tiny_sdxl"), ("SD 3.5 medium", "model=tiny_sd3"),
                       ("FLUX.1-dev", "model=tiny_flux")):
        cfg = compose([model])
        archs[key] = (32, 8, read_configs(str(ensure_tiny_model(cfg.model.pretrained, family=cfg.model.family))))
    # The GPU's dtype path: built in bf16 (the default dtype while constructing), saved in bf16.
    folder = bc.random_family_folder(tmp_path / "bf16", archs["FLUX.1-dev"][2], "cpu", torch.bfloat16)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    for part in ("transformer", "text_encoder_2", "vae"):
        with safe_open(str(next((folder / part).glob("*.safetensors"))), "pt") as f:
            names = f.keys()
            assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}, part

    bc.prepare_work(s)
    rows = bc.case_families(s, archs)
    assert [(r["variant"], r["switches"], r["overrides"]) for r in rows] == [
        (f"{m}, 32², {kind}", rung, over) for m in ("SDXL", "SD 3.5 medium", "FLUX.1-dev")
        for kind, rung, over in (("full", "as configured", ""), ("LoRA", "LoRA", "method=lora"))]
    for r in rows:
        assert r["unit"] == "ms/step" and r["median"] > 0 and r["memory_plan_gb"] > 0, r
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("random-")]  # each model deleted after its rows


def test_gpu_check_stops_inside_its_budget_and_says_what_it_did_not_reach(tmp_path):
    # A budget too small for any timed case: nothing that needs time starts, each is reported with the reason,
    # the report is still written, and the whole call ends well inside the budget.
    import time

    from bench import gpu_check
    t0 = time.monotonic()
    data = gpu_check.main(["--out", str(tmp_path), "--budget-s", "40"])
    assert time.monotonic() - t0 < 40
    assert data["cases"]["end_to_end"] == "not reached" and "budget" in data["not_reached"]["end_to_end"]
    assert data["cases"]["syncs"] == "not reached"
    assert json.loads((tmp_path / "gpu-latest.json").read_text())["not_reached"] == data["not_reached"]
    # A case that overruns is interrupted at the deadline, not waited for.
    d = gpu_check.Deadline(time.monotonic() + 0.5)
    t1 = time.monotonic()
    with pytest.raises(gpu_check.BudgetExceeded), d.interrupt_at_end():
        time.sleep(30)
    assert time.monotonic() - t1 < 5


def test_fused_adamw_trains_under_bf16_mixed_with_clipping(images, tmp_path):
    """Lightning refuses clipping with a fused optimizer under mixed precision unless speed.allow_clipping
    runs; with it, 2 bf16-mixed steps with gradient_clip_val=1.0 and fused AdamW train the UNet."""
    module, _ = build(images, tmp_path, "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1.0",
                      setup=False)
    before = module.unet.conv_in.weight.detach().clone()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, precision="bf16-mixed", gradient_clip_val=1.0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module)
    assert trainer.global_step == 2
    assert trainer.optimizers[0].defaults["fused"] is True
    assert not torch.equal(before, module.unet.conv_in.weight)


def test_startup_case_reads_the_first_step_line_the_trainer_logs(caplog):
    import time

    import bench.cases
    from dreambench.speed import FirstStepClock

    clock = FirstStepClock()
    with caplog.at_level("INFO", logger="dreambench"):
        before = time.time()
        clock()
        clock()  # once only
    (line,) = [r.getMessage() for r in caplog.records if "first training step" in r.getMessage()]
    # the line gives a UTC time a person reads, to the millisecond: allow its rounding
    assert re.search(r"first training step \d+\.\d s after the command started \(at 20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\)$", line)
    assert before - 1e-3 <= bench.cases.first_step_time(line) <= time.time() + 1e-3


def test_a_run_logs_when_its_last_step_ended_once_for_the_whole_run_case(caplog, images, tmp_path):
    import time

    from bench.cases import LAST_STEP, _utc
    from dreambench.train import train
    with caplog.at_level("INFO", logger="dreambench"):
        before = time.time()
        train(compose(overrides(images, tmp_path / "run", "trainer.max_steps=3", "trainer.accumulate_grad_batches=2")))
    lines = [r.getMessage() for r in caplog.records if "training step" in r.getMessage()]
    assert [x.split(" ", 3)[0] for x in lines] == ["first", "last"]  # once each, with accumulation too
    assert before <= _utc(LAST_STEP.search(lines[1]).group(1)) <= time.time() + 1e-3


def test_a_training_step_reads_nothing_back_between_logging_steps(tmp_path):
    # The bench's syncs case on the real train(): logging every 5 steps, 10 timed steps. Host reads are counted
    # two ways: aten._local_scalar_dense (.item(), bool(t), float(t): Lightning's per-metric reads used to be
    # 1.7 a step, the non-finite guard's 1.0) and dreambench's own stacked reads (speed.read_back): one per
    # logging step, the losses and the guard's flags together.
    import bench.cases as cases
    s = cases.Settings(tmp_path, reps=1, warmup=2, steps=10, quick=True, cuda=False, log=lambda *_: None)
    cases.prepare_work(s)
    res = cases.dreambench_steps(s, ["model=tiny"], ["trainer.log_every_n_steps=5"], "sync", sync_count=True)
    assert res["sync_sites"] == {"speed.read_back (losses + numerics flags, logging steps)": 2}, res["sync_sites"]
    assert res["syncs_per_step"] == 0.2


def test_bench_runs_keep_the_benchs_threads_and_read_cpu_time_over_the_window_only(tmp_path, monkeypatch):
    # A dreambench run left to itself takes every usable core and, in-process, leaves torch there for the reference
    # loop measured next; and two process_time() system calls a step were counted as dreambench's own cost.
    import time as _time

    from bench.common import StepClock, train_overrides
    from dreambench.module import DreamBoothModule
    with torch_threads(1):
        assert compose(train_overrides(tmp_path, tmp_path / "run", 3, [])).threads == 1
    with torch_threads(2):
        assert compose(train_overrides(tmp_path, tmp_path / "run", 3, [])).threads == 2
    monkeypatch.setattr(DreamBoothModule, "on_train_batch_start", lambda self, batch, i: None)
    monkeypatch.setattr(DreamBoothModule, "on_train_batch_end", lambda self, out, batch, i: None)
    calls = []
    real = _time.process_time
    monkeypatch.setattr(_time, "process_time", lambda: calls.append(1) or real())
    clock = StepClock(cpu_from=1, cpu_to=3)
    with clock:
        for k in range(4):  # what Lightning calls around each of 4 steps
            DreamBoothModule.on_train_batch_start(None, None, k)
            DreamBoothModule.on_train_batch_end(None, None, None, k)
    assert len(calls) == 2 and clock.steps_per_cpu_s(1) > 0


def test_the_reference_whole_run_trains_saves_a_pipeline_and_stamps_its_steps(tmp_path):
    # bench/reference_run.py is what `make bench`'s whole_run case times dreambench against: it must really train
    # (the UNet moves), end with the example's saved pipeline, and log the two stamps the case parses.
    from bench.cases import REF_STAMP, _utc
    from bench.common import synthetic_images
    from dreambench.models.tiny import ensure_tiny_model
    tiny = ensure_tiny_model(compose(["model=tiny"]).model.pretrained)
    inst = synthetic_images(tmp_path / "instance", 2, 64, seed=0)
    cls = synthetic_images(tmp_path / "class", 3, 64, seed=1)
    p = subprocess.run([sys.executable, "-m", "bench.reference_run", "--model", str(tiny), "--instance-dir", str(inst),
                        "--class-dir", str(cls), "--out", str(tmp_path / "out"), "--steps", "3", "--lr", "1e-3"],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                       timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    marks = {w: _utc(t) for w, t in REF_STAMP.findall(p.stderr)}
    assert marks["first training step"] <= marks["last training step ended"]
    from safetensors.torch import load_file
    before = load_file(str(next((tiny / "unet").glob("*.safetensors"))))
    after = load_file(str(next((tmp_path / "out" / "unet").glob("*.safetensors"))))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
