"""The training toolbox (docs/TOOLBOX.md): each switch is off by default, and on it does what its source says —
checked against a hand computation that the switch turned off (or wired wrongly) fails."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import TINY, compose, equal, torch_threads


HS = "encoder_hidden_states"  # SD's text conditioning in the module's conditioning dict (dreambench.models.families)


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def build(run_dir: Path, *extra: str):
    """A DreamBoothModule as train() builds it (tiny model, the dog's photos, cached class images), attached to a
    CPU Trainer, setup() run."""
    from hydra.utils import instantiate

    from dreambench.models.loading import load_components
    from dreambench.module import DreamBoothModule
    from dreambench.train import prepare
    tiny = [o for o in TINY if not ("prior=none" in extra and o.startswith("prior."))]
    cfg = compose(["+experiment=dog", *tiny, "logger=none", f"paths.run_dir={run_dir}", *extra])
    plan = prepare(cfg)
    comps = load_components(plan.model_ref, prediction_type=cfg.model.prediction_type)
    module = DreamBoothModule(comps, cfg, plan.instance_paths, plan.prior, "sks", instantiate(cfg.method))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=int(cfg.trainer.max_steps), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module.trainer = trainer
    module.setup("fit")
    module.log = lambda *a, **k: None  # no fit loop to log into here
    return module, cfg


# ---- pure functions ----------------------------------------------------------------------------------------------

def _sched(pt: str, **kw):
    from diffusers import DDPMScheduler
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=pt, **kw)


def test_snr_is_diffusers_compute_snr():
    from diffusers.training_utils import compute_snr

    from dreambench.losses import snr
    s = _sched("epsilon")
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(snr(s.alphas_cumprod, t), compute_snr(s, t))


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
def test_min_snr_weights_by_hand(pt):
    from dreambench.losses import min_snr_weights
    snr_t = torch.tensor([0.01, 1.0, 5.0, 100.0])
    w = min_snr_weights(snr_t, 5.0, pt)
    # by hand, Hang et al. 2023: min(SNR, γ) / SNR for ε, min(SNR, γ) / (SNR + 1) for v
    hand = {"epsilon": [1.0, 1.0, 1.0, 0.05], "v_prediction": [0.01 / 1.01, 0.5, 5 / 6, 5 / 101]}[pt]
    torch.testing.assert_close(w, torch.tensor(hand))


def test_weighted_loss_by_hand_and_identical_when_off():
    from dreambench.losses import prior_preservation_loss, weighted_loss
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 2, 2, generator=g), torch.randn(4, 4, 2, 2, generator=g)
    w = torch.tensor([1.0, 0.5, 2.0, 0.25])
    mask = torch.rand(4, 1, 2, 2, generator=g)
    loss, inst, prior = weighted_loss(pred, target, 2, 0.7, w, mask)
    per = [(mask[i] * (pred[i] - target[i]) ** 2).sum() / 16 * w[i] for i in range(4)]  # mean over c, h, w
    torch.testing.assert_close(inst, (per[0] + per[1]) / 2)
    torch.testing.assert_close(prior, (per[2] + per[3]) / 2)
    torch.testing.assert_close(loss, inst + 0.7 * prior)
    off = weighted_loss(pred, target, 2, 0.7)
    for a, b in zip(off, prior_preservation_loss(pred, target, 2, 0.7)):
        assert torch.equal(a, b)


# ---- the switches in the training step ---------------------------------------------------------------------------

def _step_by_hand(module, state, *, gamma=None, offset=0.0, perturb=0.0) -> torch.Tensor:
    """training_step's loss redone from the generator state it started from, the switches written out by hand
    (diffusers' train_text_to_image.py: --snr_gamma, --noise_offset, --input_perturbation)."""
    from dreambench.data.latents import draw_indices
    g = torch.Generator().set_state(state)
    seed = int(module.run_cfg.seed)
    inst = module.instance_bank.sample(torch.tensor(draw_indices(len(module.instance_bank), seed, [0])), g)
    cls = module.class_bank.sample(torch.tensor(draw_indices(len(module.class_bank), seed + 1, [0])), g)
    x0 = torch.cat([inst, cls])
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    if offset:
        noise = noise + offset * torch.randn((2, x0.shape[1], 1, 1), generator=g)
    noise_in = noise + perturb * torch.randn(x0.shape, generator=g) if perturb else noise
    a = module.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise_in
    pred = module.unet(noisy, t, torch.cat([module.instance_emb[HS], module.class_emb[HS]])).sample
    v = module.prediction_type == "v_prediction"
    target = a.sqrt() * noise - (1 - a).sqrt() * x0 if v else noise
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    if gamma is not None:
        snr = a.view(-1) / (1 - a.view(-1))
        per = per * torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1 if v else snr)
    return per[0] + float(module.prior.weight) * per[1], g


@pytest.mark.parametrize("switch,kw,pt", [
    ("loss.min_snr_gamma=0.5", dict(gamma=0.5), "epsilon"),
    ("loss.min_snr_gamma=0.5", dict(gamma=0.5), "v_prediction"),
    ("loss.noise_offset=0.5", dict(offset=0.5), "epsilon"),
    ("loss.input_perturbation=0.5", dict(perturb=0.5), "epsilon"),
    ("loss.input_perturbation=0.5", dict(perturb=0.5), "v_prediction"),
])
def test_loss_switch_matches_the_hand_computation(switch, kw, pt, tmp_path):
    module, _ = build(tmp_path / "run", switch, f"model.prediction_type={pt}", "prior.weight=0.7")
    state = module.noise_generator.get_state()
    with torch.no_grad():
        loss = module.training_step(None, 0)
        hand, g = _step_by_hand(module, state, **kw)
        plain, _ = _step_by_hand(module, state)  # the switch forgotten
    torch.testing.assert_close(loss, hand, rtol=1e-5, atol=1e-7)
    assert torch.equal(g.get_state(), module.noise_generator.get_state())  # and drew what the hand drew
    # The check can tell the switch on from off: the two differ by far more than the match's tolerance above
    # (10x). Not 1e-3: on a 2-core EPYC of 2026-12-04 input perturbation moved the tiny model's loss by 5.5e-4
    # (1.8267 -> 1.8257), a random UNet's output hardly depending on its input.
    assert not torch.allclose(loss, plain, rtol=1e-4, atol=0)


def test_all_switches_off_draw_and_compute_exactly_as_before(tmp_path):
    module, _ = build(tmp_path / "run")
    state = module.noise_generator.get_state()
    with torch.no_grad():
        loss = module.training_step(None, 0)
        hand, g = _step_by_hand(module, state)
    torch.testing.assert_close(loss, hand, rtol=1e-5, atol=1e-7)
    # latents, noise and timesteps, nothing more: a run with every switch off is the run from before them
    assert torch.equal(g.get_state(), module.noise_generator.get_state())


# ---- zero terminal SNR ---------------------------------------------------------------------------------------------

def test_zero_terminal_snr_rescales_training_sampling_and_export(tmp_path):
    from diffusers import DDIMScheduler
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
    module, _ = build(tmp_path / "run", "model.prediction_type=v_prediction", "model.zero_terminal_snr=true")
    plain, _ = build(tmp_path / "plain", "model.prediction_type=v_prediction")
    # training: the last timestep is pure noise (SNR 0), the betas are diffusers' rescale_zero_terminal_snr
    assert module.alphas_cumprod[-1].item() == 0.0 and plain.alphas_cumprod[-1].item() > 0
    torch.testing.assert_close(module.noise_scheduler.betas, rescale_zero_terminal_snr(plain.noise_scheduler.betas))
    # sampling and the exported model: trailing timesteps from the last one, rescaled betas
    sched = module.sampling_pipeline().scheduler
    assert isinstance(sched, DDIMScheduler) and sched.config.rescale_betas_zero_snr
    sched.set_timesteps(4)
    assert int(sched.timesteps[0]) == 999
    module.export(tmp_path / "model")
    cfg = DDIMScheduler.load_config(tmp_path / "model", subfolder="scheduler")
    assert cfg["rescale_betas_zero_snr"] is True and cfg["timestep_spacing"] == "trailing"
    # min-SNR's v form at SNR 0 is finite (weight 0), so the two switches combine
    from dreambench.losses import min_snr_weights, snr
    assert min_snr_weights(snr(module.alphas_cumprod, torch.tensor([999])), 5.0, "v_prediction").item() == 0.0


def test_zero_terminal_snr_refuses_an_epsilon_model(tmp_path):
    from dreambench.errors import UserError
    with pytest.raises(UserError, match="zero_terminal_snr=true needs a v-prediction model"):
        build(tmp_path / "run", "model.zero_terminal_snr=true")


def test_guidance_rescale_reaches_the_pipeline_and_the_class_image_key():
    from dreambench.prior.cache import ClassImageSpec, cache_key
    from dreambench.sampling import generate
    seen = {}

    class Pipe:
        def __call__(self, **kw):
            seen.update(kw)
            return type("R", (), {"images": [None] * len(kw["prompt"])})()
    g = {"num_inference_steps": 2, "guidance_scale": 5.0}
    generate(Pipe(), ["a"], [0], g, progress=False)
    assert seen["guidance_rescale"] == 0.0
    generate(Pipe(), ["a"], [0], {**g, "guidance_rescale": 0.7}, progress=False)
    assert seen["guidance_rescale"] == 0.7
    base = dict(model={"m": 1}, prompt="a dog", negative_prompt="", scheduler="DDIMScheduler")
    assert "guidance_rescale" not in ClassImageSpec(**base).as_dict()  # off: every existing cache key unchanged
    assert cache_key(ClassImageSpec(**base, guidance_rescale=0.7)) != cache_key(ClassImageSpec(**base))


# ---- EMA of the trained weights ----------------------------------------------------------------------------------

def _ema_run(run: Path, monkeypatch, *extra: str) -> tuple[dict, dict[int, list[torch.Tensor]], list]:
    """A 6-step run with EMA; returns its final checkpoint, the trained weights after every optimizer step, and the
    UNet weight each sample grid was drawn with."""
    from dreambench.callbacks import samples
    from dreambench.module import DreamBoothModule
    from dreambench.resilience.checkpoint import AtomicCheckpointIO
    from dreambench.train import train
    after: dict[int, list[torch.Tensor]] = {}
    original = DreamBoothModule.on_train_batch_end

    def record(self, outputs, batch, batch_idx):
        original(self, outputs, batch, batch_idx)
        after[self.global_step] = [p.detach().clone() for p in self.ema_parameters()]
    monkeypatch.setattr(DreamBoothModule, "on_train_batch_end", record)
    grids = []

    def fake_generate(pipe, prompts, seeds, guidance, **kw):
        grids.append(next(pipe.unet.parameters()).detach().clone())
        from PIL import Image
        return [Image.new("RGB", (32, 32))] * len(prompts)
    monkeypatch.setattr(samples, "generate", fake_generate)
    train(compose(["+experiment=dog", *TINY, f"paths.run_dir={run}", "trainer.max_steps=6",
                   "train.checkpoint_every_n_steps=6", "train.ema.enabled=true", *extra]))
    (ckpt,) = (run / "checkpoints").glob("*.ckpt")
    return AtomicCheckpointIO().load_checkpoint(ckpt), after, grids


def test_ema_is_the_hand_computed_average_and_is_what_samples_and_export_use(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    run = tmp_path / "run"
    # decay = min_decay = 0.6 pins the decay after the first update (diffusers' first update copies, decay 0);
    # every 2nd step: updates after steps 2, 4 and 6
    ckpt, w, grids = _ema_run(run, monkeypatch, "train.ema.decay=0.6", "train.ema.min_decay=0.6",
                              "train.ema.every_n_steps=2")
    hand = [0.36 * a + 0.24 * b + 0.4 * c for a, b, c in zip(w[2], w[4], w[6])]  # e=w2; e=.6e+.4w4; e=.6e+.4w6
    shadow = ckpt["dreambench_ema"]["shadow_params"]
    assert ckpt["dreambench_ema"]["optimization_step"] == 3
    for s, h in zip(shadow, hand):
        torch.testing.assert_close(s, h)
    names = [k for k in ckpt["state_dict"]]  # the trained weights (all UNet weights for dreambooth), module order
    assert len(names) == len(shadow)
    assert not all(torch.equal(ckpt["state_dict"][k], s) for k, s in zip(names, shadow))  # EMA != last weights
    exported = load_file(run / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    for k, s in zip(names, shadow):
        assert torch.equal(exported[k.removeprefix("unet.")], s), k  # the exported model is the average
    # the last sample grid was drawn with the average, not with the trained weights
    assert torch.equal(grids[-1], shadow[0]) and not torch.equal(grids[-1], w[6][0])


def test_a_lora_run_exports_the_averaged_adapters(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    run = tmp_path / "run"
    ckpt, w, _ = _ema_run(run, monkeypatch, "method=lora", "train.ema.decay=0.5", "train.ema.min_decay=0.5")
    shadow = ckpt["dreambench_ema"]["shadow_params"]
    assert len(shadow) == len(ckpt["state_dict"]) == len(w[6])  # the adapters, nothing of the frozen base
    exported = list(load_file(run / "model" / "pytorch_lora_weights.safetensors").values())
    assert all(any(torch.equal(s, v) for v in exported) for s in shadow)  # every averaged adapter, as is
    lora_b = [i for i, v in enumerate(w[6]) if v.abs().sum() > 0 and not torch.equal(v, shadow[i])]
    assert lora_b and not any(torch.equal(w[6][i], v) for i in lora_b for v in exported)  # not the last weights


def test_ema_weights_swap_in_and_back_bit_for_bit_and_offload_to_cpu(tmp_path):
    module, _ = build(tmp_path / "run", "train.ema.enabled=true", "train.ema.device=cpu")
    params = module.ema_parameters()
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)  # the trained weights move away from the average
    trained = [p.detach().clone() for p in params]
    assert all(s.device.type == "cpu" for s in module.ema.shadow_params)
    with module.ema_weights():
        assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(p, t) for p, t in zip(params, trained))
    off, _ = build(tmp_path / "off")
    assert off.ema is None  # off by default


def test_drift_metrics_are_measured_on_the_ema_weights(tmp_path, dataset_root, monkeypatch):
    from dreambench.callbacks import drift
    from dreambench.data.dreambench import subject
    module, cfg = build(tmp_path / "run", "train.ema.enabled=true")
    module.subject = subject(dataset_root, "dog")
    with torch.no_grad():
        for p in module.ema_parameters():
            p.add_(1.0)  # trained weights != the average (still the initial weights)
    seen = []

    class Sampled(Exception):
        pass

    def fake_generate(pipe, *a, **k):
        seen.append(next(pipe.unet.parameters()).detach().clone())
        raise Sampled  # the metrics themselves need encoders: what matters is which weights sampled
    monkeypatch.setattr(drift, "generate", fake_generate)
    monitor = drift.DriftMonitor(every_n_steps=1, scorer=object())
    with pytest.raises(Sampled):
        monitor.measure(module)
    assert torch.equal(seen[0], module.ema.shadow_params[0])
    assert torch.equal(next(module.unet.parameters()), module.ema.shadow_params[0] + 1.0)  # trained ones back


# ---- validation loss -----------------------------------------------------------------------------------------------

VAL = ("train.val_loss.holdout=1", "train.val_loss.class_images=1", "train.val_loss.timesteps=2")


def test_val_loss_is_the_hand_computed_mse_on_held_out_images(tmp_path, dataset_root):
    from dreambench.data.latents import LatentBank
    module, cfg = build(tmp_path / "run", "train.val_loss.every_n_steps=1", "train.val_loss.seed=3", *VAL)
    photos = sorted(p for p in (dataset_root / "dog").iterdir() if not p.name.startswith("."))
    assert module.val_paths == photos[-1:] and module.instance_paths == photos[:-1]
    assert len(module.instance_bank) == len(photos) - 1  # held out of training
    assert len(module.class_bank) == int(cfg.prior.num_images) - 1 and len(module.val_class_paths) == 1
    out = module.validation_loss()
    # by hand: latent means, t = 250 and 750 (2 of 1000, evenly spread), noise from its own generator (seed 3)
    x0 = torch.cat([LatentBank.from_paths(module.vae, p, 32).mean for p in (photos[-1:], module.val_class_paths)])
    x0 = x0.repeat_interleave(2, dim=0)
    t = torch.tensor([250, 750, 250, 750])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    a = module.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    cond = torch.cat([module.instance_emb[HS]] * 2 + [module.class_emb[HS]] * 2)
    with torch.no_grad():
        pred = module.unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, cond).sample
    err = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out["val/loss"], err.mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["val/loss_instance"], err[:2].mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["val/loss_class"], err[2:].mean(), rtol=1e-5, atol=1e-7)




def _val_run(run: Path, *extra: str) -> tuple[dict, list[dict]]:
    import csv

    from dreambench.resilience.checkpoint import AtomicCheckpointIO
    from dreambench.train import train
    train(compose(["+experiment=dog", *TINY, f"paths.run_dir={run}", "train.samples=false", "train.export_model=false",
                   "train.checkpoint_every_n_steps=6", *VAL, *extra]))
    (ckpt,) = (run / "checkpoints").glob("*.ckpt")
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return AtomicCheckpointIO().load_checkpoint(ckpt), list(csv.DictReader(f))


def test_training_with_and_without_val_loss_is_bitwise_identical(tmp_path, monkeypatch):
    from dreambench.module import DreamBoothModule
    off, _ = _val_run(tmp_path / "off")
    on, rows = _val_run(tmp_path / "on", "train.val_loss.every_n_steps=2")
    assert [r["step"] for r in rows if r.get("val/loss")] == ["2", "4", "6"]  # after 2, 4 and 6 updates
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "dreambench_rng"):
        assert equal(on[key], off[key]), key
    # ... and that can fail: a validation loss that draws its noise from the training generator changes the run
    original = DreamBoothModule.validation_loss

    def leaky(self):
        torch.randn(4, generator=self.noise_generator, device=self.device)
        return original(self)
    monkeypatch.setattr(DreamBoothModule, "validation_loss", leaky)
    bad, _ = _val_run(tmp_path / "bad", "train.val_loss.every_n_steps=2")
    assert not equal(bad["state_dict"], off["state_dict"])


def test_holding_out_every_photo_is_one_line_error(tmp_path, dataset_root):
    from dreambench.errors import UserError
    n = len([p for p in (dataset_root / "dog").iterdir() if not p.name.startswith(".")])
    with pytest.raises(UserError, match=f"train.val_loss.holdout={n} would leave no photo"):
        build(tmp_path / "run", f"train.val_loss.holdout={n}")


# ---- masked loss ---------------------------------------------------------------------------------------------------

def _masked_photos(folder: Path) -> dict[str, torch.Tensor]:
    """Four 32 px photos (the tiny model's resolution, so no resampling blurs the masks' edges): a.png with a mask
    file (left half), b.png with an alpha channel (top half opaque), c.png with neither, d.png with a 1-pixel
    checkerboard mask (area interpolation makes it 0.5 on the latent grid); a caption file beside a.
    Returns each photo's expected latent mask [1, 16, 16] by hand."""
    from PIL import Image
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in "abcd":
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    left = np.zeros((32, 32), np.uint8)
    left[:, :16] = 255
    Image.fromarray(left).save(folder / "a.mask.png")
    checker = ((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)
    Image.fromarray(checker).save(folder / "d.mask.png")  # each latent pixel covers 2 white + 2 black: 0.5
    (folder / "a.txt").write_text("a photo of {identifier} {class_noun}")
    rgba = np.concatenate([np.asarray(Image.open(folder / "b.png")), left.T[:, :, None]], axis=2)
    Image.fromarray(rgba, "RGBA").save(folder / "b.png")
    ones = torch.ones(1, 16, 16)  # the tiny VAE downsamples by 2
    a, b = ones.clone(), ones.clone()
    a[..., 8:] = 0  # latent columns 8-15 cover image columns 16-31
    b[..., 8:, :] = 0  # latent rows 8-15: transparent
    return {"a.png": a, "b.png": b, "c.png": ones, "d.png": ones / 2}


def test_masked_loss_by_hand(tmp_path):
    from dreambench.data.latents import draw_indices
    folder = tmp_path / "photos"
    hand_masks = _masked_photos(folder)
    data = [f"data.instance_dir={folder}", "data.subject=toy", "data.class_noun=toy", "data.live=false",
            "prior=none", "data.batch_size=4"]
    module, cfg = build(tmp_path / "run", *data, "loss.mask=true")
    assert [p.name for p in module.instance_paths] == ["a.png", "b.png", "c.png", "d.png"]  # no mask/caption
    names = [p.name for p in module.instance_paths]
    assert module.instance_bank.mean.shape[-2:] == (16, 16)
    assert torch.equal(module.instance_bank.mask, torch.stack([hand_masks[n] for n in names]))
    state = module.noise_generator.get_state()
    with torch.no_grad():
        loss = module.training_step(None, 0)
        g = torch.Generator().set_state(state)
        idx = torch.tensor(draw_indices(4, int(cfg.seed), range(4)))
        x0 = module.instance_bank.sample(idx, g)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (4,), generator=g)
        a = module.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        pred = module.unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, module.instance_emb[HS].expand(4, -1, -1)).sample
        err = (pred - noise) ** 2
        m = torch.stack([hand_masks[names[i]] for i in idx])
        hand = (m * err).mean()  # per sample mean(mask · err) (kohya: no renormalisation), then over the batch
    torch.testing.assert_close(loss, hand, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(loss, err.mean(), rtol=1e-3)  # unmasked: another number
    off, _ = build(tmp_path / "off", *data)
    assert off.instance_bank.mask is None  # off by default: no mask is even read
    flip, _ = build(tmp_path / "flip", *data, "loss.mask=true", "data.hflip=true")  # mirror images, mirror masks
    assert torch.equal(flip.instance_bank.mask[4], hand_masks["a.png"].flip(-1))


def test_a_mask_of_another_size_is_refused(tmp_path):
    from PIL import Image

    from dreambench.data.sidecars import load_mask
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    Image.new("L", (16, 32)).save(tmp_path / "a.mask.png")
    with pytest.raises(ValueError, match="mask is 16x32 px but its photo a.png is 32x32"):
        load_mask(tmp_path / "a.png")


# ---- captions ------------------------------------------------------------------------------------------------------

def _captioned_photos(folder: Path) -> None:
    from PIL import Image
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in "abc":
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    (folder / "a.txt").write_text("a photo of  {identifier} {class_noun}\non grass\n")
    (folder / "b.txt").write_text("{identifier} {class_noun}")


def _data(folder: Path, *extra: str) -> list[str]:
    return [f"data.instance_dir={folder}", "data.subject=toy", "data.class_noun=toy", "data.live=false",
            "prior=none", "data.batch_size=3", *extra]


def test_captions_fill_placeholders_and_stay_cached(tmp_path, monkeypatch):
    from dreambench.data.latents import draw_indices
    folder = tmp_path / "photos"
    _captioned_photos(folder)
    module, cfg = build(tmp_path / "run", *_data(folder, "data.captions=true"))
    assert module.photo_prompts == ["a photo of sks toy on grass", "sks toy", "a sks toy"]  # c: instance_prompt
    # the embeddings are computed once in setup: a training step never runs the frozen text encoder
    monkeypatch.setattr(module.text_encoder, "forward", lambda *a, **k: pytest.fail("text encoder ran in a step"))
    cond = module._draw(0)[1][HS]
    monkeypatch.undo()
    idx = draw_indices(3, int(cfg.seed), range(3))
    with torch.no_grad():
        hand = torch.cat([module.text_encoder(module._tokenize(module.photo_prompts[i]))[0] for i in idx])
    torch.testing.assert_close(cond, hand)
    assert not torch.allclose(cond, module.instance_emb[HS].expand(3, -1, -1))  # not the one instance prompt
    off, _ = build(tmp_path / "off", *_data(folder))
    assert not off.captioned and torch.equal(off._draw(0)[1][HS], off.instance_emb[HS].expand(3, -1, -1))


def test_caption_dropout_is_seeded_by_position_and_touches_no_generator(tmp_path):
    folder = tmp_path / "photos"
    _captioned_photos(folder)
    module, cfg = build(tmp_path / "run", *_data(folder, "data.captions=true", "data.caption_dropout=0.5"))
    plain, _ = build(tmp_path / "plain", *_data(folder, "data.captions=true"))
    cond = module._draw(0)[1][HS]
    plain_cond = plain._draw(0)[1][HS]
    assert torch.equal(module.noise_generator.get_state(), plain.noise_generator.get_state())
    # the spec: position j is dropped when the j-th uniform of the stream seeded [seed, 0xCA97] is < p
    dropped = np.random.default_rng([int(cfg.seed), 0xCA97]).random(3) < 0.5
    for j in range(3):
        expect = module.empty_emb[HS][0] if dropped[j] else plain_cond[j]
        assert torch.equal(cond[j], expect), j
    table = module._dropped(int(cfg.seed), 0, 4000)  # over many positions: the asked-for rate
    assert abs(table.float().mean().item() - 0.5) < 0.03
    assert torch.equal(module._dropped(int(cfg.seed), 5, 3), table[5:8])  # a pure function of the position


def test_a_caption_that_cannot_be_filled_is_one_line_naming_its_file(tmp_path):
    from dreambench.errors import UserError
    folder = tmp_path / "photos"
    _captioned_photos(folder)
    (folder / "c.txt").write_text("a {subject} on a table")
    with pytest.raises(UserError, match=r"c\.txt: caption 'a \{subject\} on a table' cannot be filled"):
        build(tmp_path / "run", *_data(folder, "data.captions=true"))


def test_captions_with_a_trained_text_encoder_are_encoded_each_step(tmp_path):
    from dreambench.data.latents import draw_indices
    folder = tmp_path / "photos"
    _captioned_photos(folder)
    module, cfg = build(tmp_path / "run", *_data(folder, "data.captions=true", "model.train_text_encoder=true",
                                                 "data.caption_dropout=0.5"))
    assert module.train_text_encoder and not hasattr(module, "caption_embs")
    cond = module._draw(0)[1][HS]
    idx = draw_indices(3, int(cfg.seed), range(3))
    dropped = np.random.default_rng([int(cfg.seed), 0xCA97]).random(3) < 0.5
    prompts = ["" if d else module.photo_prompts[i] for i, d in zip(idx, dropped)]
    hand = module.text_encoder(torch.cat([module._tokenize(p) for p in prompts]))[0]
    torch.testing.assert_close(cond, hand)


# ---- search spaces ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["toolbox", "min_snr"])
def test_search_space_trials_compose_validate_and_set_the_switches(name, tmp_path):
    """Every value of each toolbox dimension, written as the sweeper writes a trial's overrides (key=repr(value)),
    composes, validates clean and reaches its key (`choice(false, true)` a bool, `choice(0, ...)` a number)."""
    from helpers import CONF
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from dreambench.schema import problems
    from dreambench.sweep.space import parse
    base = ["+experiment=dog", f"+hparams_search={name}", f"paths.run_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra_cfg = hydra_compose("train", overrides=base, return_hydra_config=True).hydra
    params = OmegaConf.to_container(hydra_cfg.sweeper.params)
    space, _ = parse(params, [])
    assert {"optimizer.lr", "prior.weight", "loss.min_snr_gamma"} <= set(space)
    for key, dist in space.items():
        values = getattr(dist, "choices", None) or [dist.low, dist.high]
        for v in values:
            cfg = compose([*base, f"{key}={v!r}"])
            assert problems(cfg) == [], (key, v)
            assert OmegaConf.select(cfg, key) == v and type(OmegaConf.select(cfg, key)) is type(v), (key, v)


# ---- aspect-ratio buckets -----------------------------------------------------------------------------------------

def _shaped_photos(folder: Path) -> None:
    from PIL import Image
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name, (w, h) in {"land.png": (48, 32), "port.png": (32, 48), "square.png": (40, 40)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)


def _bucket_data(folder: Path, *extra: str) -> list[str]:
    return [f"data.instance_dir={folder}", "data.subject=toy", "data.class_noun=toy", "data.live=false",
            "data.buckets=true", *extra]


def test_buckets_follow_each_photos_aspect_and_the_step_is_the_hand_computation(tmp_path):
    from dreambench.data.latents import draw_indices
    folder = tmp_path / "photos"
    _shaped_photos(folder)
    module, cfg = build(tmp_path / "run", *_bucket_data(folder, "prior.weight=0.7"))
    # by hand, diffusers' ladder for 32² px in steps of 4 (tiny VAE x UNet downsampling, 2 x 2): 3:2 -> h = √(1024/1.5)
    # = 26.1 -> 28, w = 39.2 -> 40; 2:3 the transpose; 1:1 -> 32 x 32
    assert module.photo_buckets == [(28, 40), (40, 28), (32, 32)]  # land, port, square (name order)
    assert [tuple(b.mean.shape[-2:]) for b in module.bucket_banks] == [(14, 20), (20, 14), (16, 16)]
    state = module.noise_generator.get_state()
    with torch.no_grad():
        loss = module.training_step(None, 0)
        g = torch.Generator().set_state(state)
        i = draw_indices(3, int(cfg.seed), [0])[0]
        x_i = module.bucket_banks[i].sample(torch.tensor([0]), g)
        x_c = module.class_bank.sample(torch.tensor(draw_indices(len(module.class_bank), int(cfg.seed) + 1, [0])), g)
        n_i, n_c = torch.randn(x_i.shape, generator=g), torch.randn(x_c.shape, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        a = module.noise_scheduler.alphas_cumprod[t]
        mse = []
        for k, (x, n, c) in enumerate([(x_i, n_i, module.instance_emb[HS]), (x_c, n_c, module.class_emb[HS])]):
            pred = module.unet(a[k].sqrt() * x + (1 - a[k]).sqrt() * n, t[k:k + 1], c).sample
            mse.append(((pred - n) ** 2).mean())
    torch.testing.assert_close(loss, mse[0] + 0.7 * mse[1], rtol=1e-5, atol=1e-7)
    assert torch.equal(g.get_state(), module.noise_generator.get_state())


def test_buckets_need_batch_size_one(tmp_path):
    from dreambench.schema import problems
    cfg = compose(["+experiment=dog", *TINY, f"paths.run_dir={tmp_path}", "data.buckets=true", "data.batch_size=2"])
    assert problems(cfg) == ["data.buckets=true trains one photo per step (each at its own shape): "
                             "data.batch_size=2 must be 1"]


def test_interrupted_and_resumed_run_with_buckets_is_bitwise_identical(tmp_path, monkeypatch):
    import signal

    from dreambench.module import DreamBoothModule
    from dreambench.resilience.checkpoint import AtomicCheckpointIO
    from dreambench.train import train
    folder = tmp_path / "photos"
    _shaped_photos(folder)
    common = ["+experiment=dog", *TINY, *_bucket_data(folder, "data.hflip=true", "loss.mask=true",
                                                      "loss.noise_offset=0.1", "train.ema.enabled=true"),
              "train.samples=false", "train.export_model=false", "trainer.max_steps=6",
              "train.checkpoint_every_n_steps=6"]

    def final(run: Path) -> dict:
        (ckpt,) = (run / "checkpoints").glob("*.ckpt")
        return AtomicCheckpointIO().load_checkpoint(ckpt)
    train(compose([*common, f"paths.run_dir={tmp_path / 'full'}"]))
    original = DreamBoothModule.on_train_batch_end

    def hooked(self, outputs, batch, batch_idx):
        original(self, outputs, batch, batch_idx)
        if self.global_step == 2:
            signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(DreamBoothModule, "on_train_batch_end", hooked)
    assert train(compose([*common, f"paths.run_dir={tmp_path / 'part'}"]))["preempted"]
    monkeypatch.setattr(DreamBoothModule, "on_train_batch_end", original)
    train(compose([*common, f"paths.run_dir={tmp_path / 'part'}", "resume=auto"]))
    full, part = final(tmp_path / "full"), final(tmp_path / "part")
    for key in ("state_dict", "optimizer_states", "dreambench_rng", "dreambench_ema"):
        assert equal(full[key], part[key]), key
