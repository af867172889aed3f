"""Non-finite losses/gradients stop (or skip) with the step named, the last good checkpoint stays; trainable
weights stay fp32 under mixed precision; a VAE that overflows in fp16 runs in fp32."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY, compose

BAD_STEP = 5


def _poison_loss_at(monkeypatch, step: int) -> None:
    """The loss of the `step`-th training step (1-based) becomes NaN, as a diverging run's would."""
    from dreambench import losses
    original = losses.prior_preservation_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, inst, prior = original(*args, **kwargs)
        return (loss * float("nan"), inst, prior) if calls["n"] == step else (loss, inst, prior)
    monkeypatch.setattr(losses, "prior_preservation_loss", poisoned)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from dreambench.resilience import NonFiniteError
    from dreambench.resilience.checkpoint import AtomicCheckpointIO
    from dreambench.train import train
    _poison_loss_at(monkeypatch, BAD_STEP)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=f"non-finite loss \\(nan\\) at training step {BAD_STEP} of 8"):
        train(compose(["+experiment=dog", *TINY, f"paths.run_dir={run}", "trainer.max_steps=8",
                       "train.checkpoint_every_n_steps=2", "train.keep_checkpoints=1"]))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step=000004.ckpt"]  # nothing newer, intact
    ck = AtomicCheckpointIO().load_checkpoint(run / "checkpoints" / "step=000004.ckpt")
    assert ck["global_step"] == 4 and all(torch.isfinite(v).all() for v in ck["state_dict"].values())
    assert not (run / "metrics.json").exists() and not (run / "model").exists()


def test_skip_drops_the_bad_step_and_training_goes_on(tmp_path, monkeypatch, caplog):
    from dreambench.train import train
    _poison_loss_at(monkeypatch, 3)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="dreambench"):
        metrics = train(compose(["+experiment=dog", *TINY, f"paths.run_dir={run}", "train.on_nonfinite=skip",
                                 "train.export_model=false", "train.checkpoint_every_n_steps=6"]))
    assert metrics["steps"] == 6 and metrics["train/skipped_steps"] == 1.0
    assert "non-finite loss (nan) at training step 3 of 6: step skipped" in caplog.text
    ck = torch.load(run / "checkpoints" / "step=000006.ckpt", weights_only=True)
    # Without the skip, the NaN gradients of step 3 would have made every updated weight NaN.
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())


def test_between_logging_steps_a_bad_step_is_dropped_on_the_device_and_stops_at_the_next_check(tmp_path, monkeypatch):
    # Logging every 5 steps: the guard reads its flag back at step 5 (or before a checkpoint). Step 3 is NaN; the
    # checkpoint of step 4 is refused, and the weights after step 3 are those of step 2 (sticky flag).
    from dreambench.resilience import NonFiniteError
    from dreambench.train import train
    _poison_loss_at(monkeypatch, 3)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="non-finite loss \\(nan\\) at training step 3 of 8"):
        train(compose(["+experiment=dog", *TINY, f"paths.run_dir={run}", "trainer.max_steps=8",
                       "trainer.log_every_n_steps=5", "train.checkpoint_every_n_steps=2", "train.keep_checkpoints=3"]))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step=000002.ckpt"]


def test_the_fused_step_is_dropped_on_the_device_without_a_host_sync():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.common import SyncCounter
    from dreambench.resilience import NumericsGuard

    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    trainer = SimpleNamespace(global_step=0, max_steps=10, log_every_n_steps=5, is_global_zero=True, loggers=[],
                              callback_metrics={}, precision_plugin=SimpleNamespace(scaler=None))
    guard = NumericsGuard("skip")
    history = []
    counter = SyncCounter()
    with counter:
        for step, grad in enumerate([1.0, float("nan"), 1.0]):
            trainer.global_step = step
            p.grad = torch.full((4,), grad)
            guard.on_before_backward(trainer, None, torch.tensor(0.5 if grad == grad else grad))
            guard.on_before_optimizer_step(trainer, None, opt)
            opt.step()
            history.append((p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["step"].clone()))
    assert counter.count == 0, counter.where  # nothing read back between checks
    assert torch.equal(history[1][0], history[0][0]) and torch.equal(history[1][1], history[0][1])
    assert float(history[1][2]) == 1.0 and float(history[2][2]) == 2.0  # the dropped step is not counted
    assert not torch.equal(history[2][0], history[1][0]) and torch.isfinite(history[2][0]).all()
    trainer.global_step = 5
    guard.on_train_batch_end(trainer, None, None, None, 4)  # a logging step: one read, the skip reported
    assert trainer.callback_metrics["train/skipped_steps"] == 1.0


def _guard_step(guard, loss, grads, scaler=None):
    p = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for q, g in zip(p, grads):
        q.grad = g
    opt = torch.optim.SGD(p, lr=0.1)
    trainer = SimpleNamespace(global_step=6, max_steps=10, precision_plugin=SimpleNamespace(scaler=scaler))
    module = SimpleNamespace(log=lambda *a, **k: None)
    guard.on_before_backward(trainer, module, torch.tensor(loss))
    guard.on_before_optimizer_step(trainer, module, opt)
    return p


def test_non_finite_gradient_with_finite_loss_is_caught():
    from dreambench.resilience import NonFiniteError, NumericsGuard
    with pytest.raises(NonFiniteError, match="non-finite gradient at training step 7 of 10"):
        _guard_step(NumericsGuard("stop"), 0.5, [torch.ones(3), torch.tensor([1.0, float("inf")])])
    p = _guard_step(NumericsGuard("skip"), 0.5, [torch.ones(3), torch.tensor([float("nan")])])
    assert all(q.grad is None for q in p)  # the optimizer will leave these weights alone
    p = _guard_step(NumericsGuard("stop"), 0.5, [torch.ones(3)])
    assert p[0].grad is not None  # finite: untouched
    # With a GradScaler (16-mixed), inf gradients are the scaler's to skip: only the loss is checked.
    _guard_step(NumericsGuard("stop"), 0.5, [torch.tensor([float("inf")])], scaler=object())
    with pytest.raises(NonFiniteError, match="loss"):
        _guard_step(NumericsGuard("stop"), float("inf"), [torch.ones(1)], scaler=object())


def test_half_precision_trainable_weights_are_refused():
    from dreambench.errors import UserError
    from dreambench.resilience import NumericsGuard
    m = torch.nn.Linear(2, 2).half()
    with pytest.raises(UserError, match="trainable weights must be fp32"):
        NumericsGuard().on_fit_start(None, m)
    NumericsGuard().on_fit_start(None, torch.nn.Linear(2, 2))


def test_bf16_mixed_keeps_fp32_weights_and_optimizer_state(tmp_path):
    from dreambench.train import train
    run = tmp_path / "run"
    metrics = train(compose(["+experiment=dog", *TINY, f"paths.run_dir={run}", "trainer.max_steps=2",
                             "trainer.precision=bf16-mixed", "train.checkpoint_every_n_steps=2",
                             # fused AdamW + gradient clipping is refused by Lightning's mixed-precision plugin
                             "optimizer.fused=false",
                             "train.export_model=false"]))
    assert metrics["steps"] == 2
    ck = torch.load(run / "checkpoints" / "step=000002.ckpt", weights_only=True)
    assert {v.dtype for v in ck["state_dict"].values()} == {torch.float32}
    moments = [s["exp_avg"] for s in ck["optimizer_states"][0]["state"].values()]
    assert moments and {m.dtype for m in moments} == {torch.float32}


@pytest.mark.parametrize("mode,precision,force,expected", [
    ("auto", "16-mixed", True, True), ("auto", "16-mixed", False, False), ("auto", "bf16-mixed", True, False),
    ("auto", "32-true", True, False), ("auto", 16, None, True), (True, "32-true", False, True),
    ("false", "16-mixed", True, False)])
def test_vae_fp32_decision(mode, precision, force, expected):
    from dreambench.resilience.numerics import vae_needs_fp32
    assert vae_needs_fp32(mode, precision, force) is expected


def test_vae_that_overflows_in_fp16_runs_in_fp32(tiny_model_dir):
    from diffusers import AutoencoderKL

    from dreambench.resilience.numerics import keep_vae_fp32
    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae", use_safetensors=True)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e6)  # activations beyond fp16's 65504, like SDXL's VAE on some images
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        half = vae.encode(x).latent_dist.mean
        fixed = keep_vae_fp32(copy.deepcopy(vae))
        full = fixed.encode(x).latent_dist.mean
        image = fixed.decode(full).sample
    assert half.dtype == torch.float16 and not torch.isfinite(half).all()  # the failure being guarded against
    assert full.dtype == torch.float32 and torch.isfinite(full).all() and image.dtype == torch.float32
    assert torch.isfinite(image).all()


def _poison_grad_at(monkeypatch, step: int) -> None:
    """The `step`-th training step (1-based) gets an inf gradient in one UNet weight while its loss stays finite."""
    from dreambench.module import DreamBoothModule
    original = DreamBoothModule.training_step
    calls = {"n": 0}

    def poisoned(self, batch, batch_idx):
        calls["n"] += 1
        loss = original(self, batch, batch_idx)
        if calls["n"] == step:
            w = self.unet.conv_in.weight
            handle = w.register_hook(lambda g: (handle.remove(), g * float("inf"))[1])
        return loss
    monkeypatch.setattr(DreamBoothModule, "training_step", poisoned)


@pytest.mark.parametrize("clip", ["1.0", "null"])
def test_a_non_finite_gradient_in_a_run_is_caught_with_and_without_clipping(clip, tmp_path, monkeypatch, caplog):
    # With clipping by norm (the default) the guard reads the clip's total norm (one pass over the gradients);
    # without, its own norms. Either way the step is named and, in skip mode, dropped.
    from dreambench.resilience import NonFiniteError
    from dreambench.train import train
    _poison_grad_at(monkeypatch, 3)
    with pytest.raises(NonFiniteError, match="non-finite gradient at training step 3 of 6"):
        train(compose(["+experiment=dog", *TINY, f"paths.run_dir={tmp_path / 'stop'}", f"trainer.gradient_clip_val={clip}",
                       "train.export_model=false"]))
    _poison_grad_at(monkeypatch, 3)
    run = tmp_path / "skip"
    with caplog.at_level(logging.WARNING, logger="dreambench"):
        metrics = train(compose(["+experiment=dog", *TINY, f"paths.run_dir={run}", f"trainer.gradient_clip_val={clip}",
                                 "train.on_nonfinite=skip", "train.export_model=false",
                                 "train.checkpoint_every_n_steps=6"]))
    assert metrics["train/skipped_steps"] == 1.0 and "non-finite gradient at training step 3 of 6" in caplog.text
    ck = torch.load(run / "checkpoints" / "step=000006.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())


def test_clipping_hands_the_guard_its_total_norm_instead_of_a_second_pass(tmp_path, monkeypatch):
    from dreambench.resilience import numerics
    from dreambench.train import train
    passes = {"own": 0}
    own = numerics._grad_norms

    def counting(optimizer):
        passes["own"] += 1
        return own(optimizer)
    monkeypatch.setattr(numerics, "_grad_norms", counting)
    train(compose(["+experiment=dog", *TINY, f"paths.run_dir={tmp_path / 'a'}", "train.export_model=false",
                   "train.samples=false"]))
    assert passes["own"] == 0
    train(compose(["+experiment=dog", *TINY, f"paths.run_dir={tmp_path / 'b'}", "train.export_model=false",
                   "train.samples=false", "trainer.gradient_clip_val=null"]))
    assert passes["own"] == 6


def test_with_clipping_a_non_finite_loss_is_caught_even_when_no_parameter_has_a_gradient():
    # The guard leaves its check to the clip (checks_after_clip); with no gradient there is no norm to clip, and
    # the loss must still be checked there.
    from dreambench.module import DreamBoothModule
    from dreambench.resilience import NonFiniteError, NumericsGuard
    guard = NumericsGuard("stop")
    trainer = SimpleNamespace(global_step=6, max_steps=10, gradient_clip_val=1.0, gradient_clip_algorithm=None,
                              precision_plugin=SimpleNamespace(scaler=None), callbacks=[guard])
    module = SimpleNamespace(trainer=trainer, clip_feeds_guard=True, log=lambda *a, **k: None)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)  # no .grad
    guard.on_before_backward(trainer, module, torch.tensor(float("nan")))
    guard.on_before_optimizer_step(trainer, module, opt)  # left to the clip
    with pytest.raises(NonFiniteError, match="non-finite loss \\(nan\\) at training step 7 of 10"):
        DreamBoothModule.configure_gradient_clipping(module, opt, 1.0, None)
