"""A tiny run end to end, in process and through the CLI, and the one-line errors of bad input."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import TINY, compose, run_cli


def _reload_and_generate(model_dir: Path) -> Image.Image:
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe("a sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]


def _check_before_after(samples: Path) -> None:
    """before_after.png holds, row by row, each prompt's tiles of the first grid and then of the last."""
    import numpy as np

    def tiles(path: Path, cols: int) -> list[np.ndarray]:
        # image_grid's layout: 2 px padding, 32 px images enlarged to 128 px, a 12 px label under each
        im = np.asarray(Image.open(path).convert("RGB"))
        rows = (im.shape[0] - 2) // (128 + 2 + 12)
        return [im[2 + r * 142:2 + r * 142 + 128, 2 + c * 130:2 + c * 130 + 128] for r in range(rows)
                for c in range(cols)]

    first, last = tiles(samples / "step_000000.png", 4), tiles(samples / "step_000006.png", 4)
    both = tiles(samples / "before_after.png", 4)
    assert len(first) == len(last) == 8 and len(both) == 16  # 4 prompts x 2 seeds, twice
    for prompt in range(4):
        row = both[4 * prompt:4 * prompt + 4]
        for seed in range(2):
            assert np.array_equal(row[seed], first[2 * prompt + seed])
            assert np.array_equal(row[2 + seed], last[2 * prompt + seed])
    assert not all(np.array_equal(a, b) for a, b in zip(first, last))  # training changed what it draws


def test_in_process_run_writes_the_run_folder(tmp_path):
    import random

    from dreambench.train import train
    seed = f"prior.seed={random.Random().randrange(10**6)}"  # class-image keys of its own, whatever the cache holds
    run = tmp_path / "run"
    cfg = compose(["+experiment=dog", *TINY, f"paths.run_dir={run}", "train.checkpoint_every_n_steps=3",
                   "train.sample_every_n_steps=3", seed])
    metrics = train(cfg)

    assert json.loads((run / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["steps"] == 6 and metrics["identifier"] == "sks" and metrics["instance_prompt"] == "a sks dog"
    for key in ("train/loss", "train/loss_instance", "train/loss_prior", "wall_time_s"):
        assert isinstance(metrics[key], float) and metrics[key] == metrics[key]  # present and not NaN
    assert metrics["prior"]["kind"] == "generated" and metrics["prior"]["count"] == 2
    assert (run / "config.yaml").read_text().count("subject: dog") == 1
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "before_after.png", "step_000000.png", "step_000003.png", "step_000006.png"]
    _check_before_after(run / "samples")
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    assert [c.name for c in ckpts] == ["step=000006.ckpt"]  # keep_checkpoints=1
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)["state_dict"]
    assert state and all(k.startswith("unet.") for k in state)  # only what was trained, not the VAE
    assert (run / "logs" / "metrics.csv").is_file()
    image = _reload_and_generate(run / "model")
    assert image.size == (32, 32)

    # The same class-image key hits the cache; a changed sampling setting misses it.
    again = train(compose(["+experiment=dog", *TINY, f"paths.run_dir={tmp_path / 'again'}", "trainer.max_steps=1",
                           seed]))
    assert again["prior"]["cache_hit"] is True and again["prior"]["folder"] == metrics["prior"]["folder"]
    changed = train(compose(["+experiment=dog", *TINY, f"paths.run_dir={tmp_path / 'changed'}", "trainer.max_steps=1",
                             "guidance.guidance_scale=3.0", seed]))
    assert changed["prior"]["cache_hit"] is False and changed["prior"]["folder"] != metrics["prior"]["folder"]


def test_trained_weights_differ_from_the_base_and_frozen_ones_do_not(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from dreambench.train import train
    run = tmp_path / "run"
    no_prior = [o for o in TINY if not o.startswith("prior.")]
    train(compose(["+experiment=dog", *no_prior, f"paths.run_dir={run}", "prior=none"]))
    for part, changed in [("unet", True), ("vae", False), ("text_encoder", False)]:
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        a, b = load_file(tiny_model_dir / part / name), load_file(run / "model" / part / name)
        same = all(torch.equal(a[k], b[k]) for k in a)
        assert same != changed, part


def test_zero_steps_is_the_base_model_as_a_run_folder(tmp_path, tiny_model_dir):
    # Table 1's untrained row (conf/recipe/table1_untrained.yaml): no training step, no class images, and a run
    # folder that evaluate and generate read like any other, holding the base model's own weights.
    from safetensors.torch import load_file

    from dreambench.train import train
    run = tmp_path / "run"
    mine = [o for o in TINY if not o.startswith(("prior.", "trainer.max_steps"))]
    metrics = train(compose(["+experiment=dog", *mine, "+recipe=table1_untrained", f"paths.run_dir={run}"]))
    assert metrics["steps"] == 0 and metrics["prior"]["kind"] == "none"
    for part in ("unet", "vae", "text_encoder"):
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        a, b = load_file(tiny_model_dir / part / name), load_file(run / "model" / part / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


def test_cli_run_with_wandb_offline(tmp_path):
    run = tmp_path / "cli-run"
    started = time.monotonic()
    r = run_cli("dreambench.train", ["+experiment=dog", *[o for o in TINY if not o.startswith("logger")],
                                     f"hydra.run.dir={run}"], env={**os.environ, "WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"dreambench: run folder: {run}" in r.stdout
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "metrics.json").is_file()
    # One console line per record (Lightning's and transformers' own handlers used to print each twice), the
    # line in the run's log too, and nothing a user cannot act on (dreambench.utils.logs).
    console = r.stdout + r.stderr
    assert console.count("`Trainer.fit` stopped") == 1 and "`Trainer.fit` stopped" in (run / "train.log").read_text()
    for noise in ("💡 Tip", "requires torchvision", "module(s) in eval mode", "LeafSpec", "GPU available: False",
                  "TPU available: False"):
        assert noise not in console, noise
    # progress=false (TINY): no bar of transformers' or diffusers' either (loading, and saving model/)
    for bar in ("Loading weights", "Writing model shards", "Loading pipeline components", "it/s]"):
        assert bar not in console, bar
    # Start-up in seconds a person reads (it used to be a bare unix time), measured from the process's start,
    # and the clock time in UTC; the threads the run chose, and why.
    after = float(re.search(r"first training step ([0-9.]+) s after the command started \(at 20[0-9-]+T[0-9:.]+Z\)",
                            console).group(1))
    assert 0 < after < time.monotonic() - started
    if "OMP_NUM_THREADS" in os.environ:  # set by the user, or by conftest for an xdist worker
        assert f"torch threads: {os.environ['OMP_NUM_THREADS']} (OMP_NUM_THREADS; set threads=N" in console
    else:
        assert re.search(r"torch threads: \d+ \(.*usable cores \(affinity \d+, cgroup quota .*\) / 1 rank on this "
                         r"machine; set threads=N to choose\)", console)
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run"
    assert _reload_and_generate(run / "model").size == (32, 32)

    # dreambench.generate samples the run's model/ with the guidance group; {identifier} comes from the run
    g = run_cli("dreambench.generate", [f"run={run}", "num_images=2", "guidance.num_inference_steps=2",
                                        'prompts=["a {identifier} {class_noun} on the beach"]', "progress=false",
                                        f"out={tmp_path / 'gen'}"])
    assert g.returncode == 0, g.stderr[-3000:]
    assert "Loading" not in g.stderr and "it/s]" not in g.stderr, g.stderr[-3000:]  # progress=false: no bars
    prompts = json.loads((tmp_path / "gen" / "prompts.json").read_text())
    assert [p["prompt"] for p in prompts] == ["a sks dog on the beach"] * 2 and [p["seed"] for p in prompts] == [0, 1]
    assert Image.open(tmp_path / "gen" / prompts[0]["file"]).size == (32, 32)
    assert (tmp_path / "gen" / "grid.png").is_file()
    bad = run_cli("dreambench.generate", [f"run={tmp_path}"])
    assert bad.returncode == 2 and "no model/ folder" in bad.stderr


def _bad_images(folder: Path) -> Path:
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


ERROR_CASES = {
    "no subject": ([], "missing required config value(s): data.class_noun, data.live, data.subject"),
    "unknown subject": (["+experiment=dog", "data.subject=dogg"], "'dogg' is not in DreamBench"),
    "missing dataset": (["+experiment=dog", "paths.dataset_dir=/nonexistent/dreambench"],
                        "DreamBench data set not found at /nonexistent/dreambench"),
    "missing model": (["+experiment=dog", "model.pretrained=/nonexistent/sd15", "model.build_tiny=false"],
                      "model.pretrained=/nonexistent/sd15: no diffusers model folder there"),
    "hub model offline": (["+experiment=dog", "model=sd15"], "download it once or point model.pretrained at a local"),
    "bad image": (["+experiment=dog", "data.instance_dir={bad}"], "broken.jpg: truncated or corrupt"),
    "photo instead of its folder": (["+experiment=dog", "data.instance_dir={bad}/good.png"],
                                    "instance images path is not a folder: "),
    "bad resolution": (["+experiment=dog", "data.resolution=30"], "data.resolution=30 must be a positive multiple of 8"),
    # Hydra's own errors, as one line with what to type instead (dreambench/cli.py)
    "misspelt key without +": (["+experiment=dog", "data.instnce_dir=/tmp"],
                               "data.instnce_dir is not a config key: did you mean data.instance_dir?; to add a "
                               "new key, prefix it with +: +data.instnce_dir=..."),
    "unknown experiment": (["+experiment=dgo"], "unknown experiment 'dgo': did you mean dog"),
    "unknown option": (["+experiment=dog", "optimizer=adam"], "unknown optimizer 'adam': did you mean adamw"),
    "~ in a path": (["+experiment=dog", "data.instance_dir=~/photos/mug"],
                    "'~' is not expanded there: write data.instance_dir=$HOME/photos/mug"),
    "= in a checkpoint path": (["+experiment=dog", "resume=/x/checkpoints/step=000300.ckpt"],
                               "a value holding '=' must be quoted inside the argument: "
                               "'resume=\"/x/checkpoints/step=000300.ckpt\"'"),
    "pickle-only model": (["+experiment=dog", "model.pretrained={pickled}", "model.build_tiny=false"],
                          "unet, vae, text_encoder hold only pickle weights (.bin), which can run code when loaded"),
    "bad threads": (["+experiment=dog", "threads=0"], "threads=0 must be null or an integer >= 1"),
}


def _pickled_model(folder: Path) -> Path:
    """A diffusers folder whose weights are pickle files only (contents never read: refused before loading)."""
    (folder / "model_index.json").parent.mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    for sub in ("unet", "vae", "text_encoder"):
        (folder / sub).mkdir()
        (folder / sub / "config.json").write_text("{}")
        (folder / sub / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    return folder


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_input_is_one_clear_line_before_any_model_loads(case, tmp_path):
    overrides, expected = ERROR_CASES[case]
    overrides = [o.format(bad=_bad_images(tmp_path / "photos")) if "{bad}" in o else o for o in overrides]
    overrides = [o.format(pickled=_pickled_model(tmp_path / "sd")) if "{pickled}" in o else o for o in overrides]
    cache = tmp_path / "cache"
    base = [o for o in TINY if not (case == "hub model offline" and o == "model=tiny")]
    r = run_cli("dreambench.train", [*overrides, *base, f"hydra.run.dir={tmp_path / 'run'}"],
                env={**os.environ, "DREAMBENCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("dreambench: error:")]
    # one error; a bad-image error goes on with one indented line per bad file
    message = r.stderr[r.stderr.index("dreambench: error:"):] if lines else ""
    assert len(lines) == 1 and expected in message, r.stderr[-2000:]
    if case == "bad image":
        assert "set data.on_bad_image=skip" in lines[0]
    assert "Traceback" not in r.stderr
    if case != "missing model":  # data and config errors come before the (tiny) model is even built
        assert not list(cache.glob("tiny-sd-*")), list(cache.iterdir())  # no build, whole or partial
    assert not (tmp_path / "run" / "model").exists()


def test_unknown_config_key_is_named(tmp_path):
    r = run_cli("dreambench.train", ["+experiment=dog", *TINY, "optimizer.learning_rate=1e-4",
                                     f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode != 0 and "learning_rate" in r.stderr and "Traceback" not in r.stderr


def test_drift_monitor_logs_val_metrics_during_a_run(tmp_path):
    import csv

    from dreambench.train import train
    run = tmp_path / "run"
    metrics = train(compose(["+experiment=dog", *TINY, f"paths.run_dir={run}", "metrics=tiny",
                             "train.drift.every_n_steps=3", "train.drift.num_prompts=1",
                             "train.drift.images_per_prompt=1", "train.drift.class_images=1",
                             "train.drift.num_inference_steps=2"]))
    for key in ("val/dino", "val/clip_i", "val/clip_t", "val/pres"):
        assert -1.0 <= metrics[key] <= 1.0, key
    with open(run / "logs" / "metrics.csv") as f:
        steps = sorted({int(r["step"]) for r in csv.DictReader(f) if r.get("val/dino")})
    assert steps == [0, 3, 6]


def test_missing_tiny_model_path_is_one_line_and_nothing_is_built_there(tmp_path):
    """A mistyped model.pretrained with model=tiny: a random model built there would later load as if it were the
    real model. Only paths.cache_dir receives a build."""
    from dreambench.errors import UserError
    from dreambench.train import prepare
    typo = tmp_path / "models" / "stable-diffusion-v1-5"
    with pytest.raises(UserError, match=f"model.pretrained={typo}: no tiny model there") as e:
        prepare(compose(["+experiment=dog", *TINY, f"model.pretrained={typo}", f"paths.run_dir={tmp_path / 'run'}"]))
    assert "\n" not in str(e.value) and "paths.cache_dir" in str(e.value)
    assert not (tmp_path / "models").exists()


def test_base_of_a_tiny_run_from_another_cache_loads_from_todays_cache(tmp_path, tiny_model_dir):
    """load_base_pipeline (LoRA / textual-inversion runs) rebuilds a gone tiny base in the cache, not at the path
    recorded in method.json (which may be another machine's or a since-deleted cache)."""
    from dreambench.methods.runs import load_base_pipeline
    gone = tmp_path / "old-cache" / tiny_model_dir.name
    pipe = load_base_pipeline({"pretrained": str(gone), "build_tiny": True})
    assert not (tmp_path / "old-cache").exists()
    ours = dict(pipe.unet.state_dict())
    from diffusers import UNet2DConditionModel
    ref = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").state_dict()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_a_run_on_cached_class_latents_trains_exactly_as_one_that_encodes_them(tmp_path):
    # data.latents_cache_dir: the second run loads the class latents the first one kept and its losses are the
    # same numbers; so are those of a run that encodes them (null: no cache).
    from dreambench.train import train
    latents = tmp_path / "latents"

    def run(name: str, *extra: str) -> dict:
        return train(compose(["+experiment=dog", *TINY, "trainer.max_steps=3", "train.samples=false",
                              "train.export_model=false", f"data.latents_cache_dir={latents}",
                              f"paths.run_dir={tmp_path / name}", *extra]))
    never = run("never", "data.latents_cache_dir=null")
    assert not latents.exists()
    first = run("first")
    kept = {f: f.stat().st_mtime_ns for f in latents.iterdir()}
    assert len(kept) == 1
    second = run("second")
    assert {f: f.stat().st_mtime_ns for f in latents.iterdir()} == kept  # read, not written again
    for key in ("train/loss", "train/loss_instance", "train/loss_prior"):
        assert first[key] == second[key] == never[key], (key, first[key], second[key], never[key])


def test_the_step_0_grid_is_kept_by_content_and_shown_again_without_sampling(tmp_path):
    # train.sample_cache_dir: a second run with the same settings shows the untrained model's images it kept,
    # pixel for pixel what sampling gives (a run without the cache), and samples nothing before its first step;
    # a setting that changes the images (guidance scale) samples again.
    import numpy as np

    from dreambench.callbacks import samples
    from dreambench.train import train
    grids = tmp_path / "grids"
    calls = []
    real = samples.generate

    def counting(*a, **k):
        calls.append(len(a[1]))
        return real(*a, **k)

    def run(name: str, *extra: str) -> np.ndarray:
        calls.clear()
        train(compose(["+experiment=dog", *TINY, "trainer.max_steps=2", "train.export_model=false",
                       f"train.sample_cache_dir={grids}", f"paths.run_dir={tmp_path / name}", *extra]))
        with Image.open(tmp_path / name / "samples" / "step_000000.png") as im:
            return np.asarray(im.convert("RGB"))
    samples.generate = counting
    try:
        never = run("never", "train.sample_cache_dir=null")
        assert calls == [8, 8]  # step 0 and the end: 4 prompts x 2 seeds each
        first = run("first")
        assert calls == [8, 8] and len(list(grids.iterdir())) == 1
        second = run("second")
        assert calls == [8]  # only the end grid: the step-0 images came from the cache
        assert np.array_equal(first, never) and np.array_equal(second, never)
        run("other guidance", "guidance.guidance_scale=3.0")
        assert calls == [8, 8] and len(list(grids.iterdir())) == 2
    finally:
        samples.generate = real
    assert (tmp_path / "second" / "samples" / "before_after.png").is_file()
