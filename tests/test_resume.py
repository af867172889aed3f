"""Exact resume: interrupted at step k and resumed to N == an uninterrupted N-step run, bit for bit (CPU)."""

from __future__ import annotations

import csv
import signal
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose, equal

N, K = 8, 3  # the interruption is asked for after step K; it takes effect at the next step boundary
COMMON = ["+experiment=dog", *TINY, "train.export_model=false", f"trainer.max_steps={N}", f"train.checkpoint_every_n_steps={N}",
          "trainer.log_every_n_steps=1", "train.lr_scheduler=cosine", "train.lr_warmup_steps=2"]


def _interrupt_after(monkeypatch, step: int) -> None:
    """A real SIGTERM to this process once global_step reaches `step` (the run's own handler takes it)."""
    from dreambench.module import DreamBoothModule
    original = DreamBoothModule.on_train_batch_end

    def hooked(self, outputs, batch, batch_idx):
        original(self, outputs, batch, batch_idx)
        if self.global_step == step:
            signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(DreamBoothModule, "on_train_batch_end", hooked)


def _interrupted_then_resumed(run: Path, monkeypatch, extra: tuple[str, ...] = ()) -> dict:
    from dreambench.module import DreamBoothModule
    from dreambench.train import train
    original = DreamBoothModule.on_train_batch_end
    _interrupt_after(monkeypatch, K)
    first = train(compose([*COMMON, *extra, f"paths.run_dir={run}"]))
    assert first["preempted"] is True and first["steps"] == K + 1, first
    assert Path(first["checkpoint"]).name == f"step={K + 1:06d}.ckpt"
    assert not (run / "metrics.json").exists() and not (run / "model").exists()  # not finished
    assert not (run / ".lock").exists()  # a preempted run releases its run folder (resume=auto takes it next)
    monkeypatch.setattr(DreamBoothModule, "on_train_batch_end", original)
    return train(compose([*COMMON, *extra, f"paths.run_dir={run}", "resume=auto"]))


def _final(run: Path) -> dict:
    from dreambench.resilience.checkpoint import AtomicCheckpointIO
    (ckpt,) = sorted((run / "checkpoints").glob("*.ckpt"))  # keep_checkpoints=1: only the newest is left
    assert ckpt.name == f"step={N:06d}.ckpt"
    return AtomicCheckpointIO().load_checkpoint(ckpt)  # weights_only=True: RNG states are plain data


def _rows(run: Path) -> list[dict]:
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))




@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from dreambench.train import train
    run = tmp_path_factory.mktemp("full") / "run"
    metrics = train(compose([*COMMON, f"paths.run_dir={run}"]))
    assert metrics["steps"] == N
    return run, _final(run), _rows(run)


def test_interrupted_and_resumed_run_is_bitwise_identical(uninterrupted, tmp_path, monkeypatch):
    _, full, full_rows = uninterrupted
    metrics = _interrupted_then_resumed(tmp_path / "run", monkeypatch)
    assert metrics["steps"] == N
    part = _final(tmp_path / "run")
    assert part["global_step"] == full["global_step"] == N
    assert equal(part["state_dict"], full["state_dict"])  # trainable weights
    assert equal(part["optimizer_states"], full["optimizer_states"])  # AdamW moments and step counts
    assert equal(part["lr_schedulers"], full["lr_schedulers"])
    assert equal(part["dreambench_rng"], full["dreambench_rng"])
    # Lightning's mid-epoch restart neither replays nor skips a step: N optimizer steps, one logged row per step,
    # and the same losses to the last bit (rows before the interruption kept, the rest logged by the resumed run).
    assert int(full["optimizer_states"][0]["state"][0]["step"]) == N
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [r["step"] for r in full_rows] and len(rows) == N
    assert rows == full_rows
    assert (tmp_path / "run" / "metrics.json").is_file()  # finished this time


def test_negative_control_without_rng_restore_the_runs_differ(uninterrupted, tmp_path, monkeypatch):
    """The test above can fail: with RNG restoration a no-op the resumed run draws other noise."""
    from dreambench.resilience import checkpoint as ckpt
    _, full, full_rows = uninterrupted
    monkeypatch.setattr(ckpt, "restore_rng", lambda *a, **k: None)
    _interrupted_then_resumed(tmp_path / "run", monkeypatch)
    part = _final(tmp_path / "run")
    assert part["global_step"] == N
    assert not equal(part["state_dict"], full["state_dict"])
    assert _rows(tmp_path / "run") != full_rows


# EMA of the trained weights (train.ema): every 3rd step, so the interruption after step K + 1 = 4 falls between two
# updates; decay 0.9 with diffusers' warm-up. The average travels in the checkpoint.
EMA = ("train.ema.enabled=true", "train.ema.decay=0.9", "train.ema.every_n_steps=3")


@pytest.fixture(scope="module")
def uninterrupted_ema(tmp_path_factory):
    from dreambench.train import train
    run = tmp_path_factory.mktemp("full_ema") / "run"
    assert train(compose([*COMMON, *EMA, f"paths.run_dir={run}"]))["steps"] == N
    return run, _final(run), _rows(run)


def test_interrupted_and_resumed_run_with_ema_is_bitwise_identical(uninterrupted_ema, tmp_path, monkeypatch):
    _, full, full_rows = uninterrupted_ema
    assert _interrupted_then_resumed(tmp_path / "run", monkeypatch, EMA)["steps"] == N
    part = _final(tmp_path / "run")
    assert full["dreambench_ema"]["optimization_step"] == N // 3  # updated after steps 3 and 6
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "dreambench_rng", "dreambench_ema"):
        assert equal(part[key], full[key]), key
    assert _rows(tmp_path / "run") == full_rows


def test_negative_control_ema_left_out_of_the_checkpoint_differs(uninterrupted_ema, tmp_path, monkeypatch):
    """The EMA test above can fail: a checkpoint without the average restarts it from the restored weights."""
    from dreambench.module import DreamBoothModule
    _, full, _ = uninterrupted_ema
    save = DreamBoothModule.on_save_checkpoint

    def without_ema(self, checkpoint):
        save(self, checkpoint)
        if self.global_step < N:
            checkpoint.pop("dreambench_ema", None)
    monkeypatch.setattr(DreamBoothModule, "on_save_checkpoint", without_ema)
    _interrupted_then_resumed(tmp_path / "run", monkeypatch, EMA)
    part = _final(tmp_path / "run")
    assert equal(part["state_dict"], full["state_dict"])  # training itself is unaffected
    assert not equal(part["dreambench_ema"], full["dreambench_ema"])


def test_resume_auto_picks_the_newest_complete_checkpoint(tmp_path):
    from dreambench.resilience.checkpoint import AtomicCheckpointIO, find_latest_checkpoint, resolve_resume
    d = tmp_path / "run" / "checkpoints"
    io = AtomicCheckpointIO()
    for step in (4, 8):
        io.save_checkpoint({"global_step": step, "w": torch.ones(3) * step}, d / f"step={step:06d}.ckpt")
    (d / "step=000012.ckpt").write_bytes((d / "step=000008.ckpt").read_bytes()[:100])  # torn (old writer)
    (d / ".step=000016.ckpt.tmp-1-abcd").write_bytes(b"partial")  # a temporary: never a candidate
    assert find_latest_checkpoint(d).name == "step=000008.ckpt"
    assert resolve_resume("auto", tmp_path / "run").name == "step=000008.ckpt"
    assert resolve_resume(str(tmp_path / "run"), tmp_path / "elsewhere").name == "step=000008.ckpt"
    assert resolve_resume("auto", tmp_path / "fresh") is None  # nothing yet: a fresh start
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoints\); a fresh run there would overwrite"):
        resolve_resume(None, tmp_path / "run")  # a fresh start into a run's folder
    assert resolve_resume(None, tmp_path / "fresh") is None


def test_missing_or_corrupt_resume_path_is_one_line_error_before_models_load(tmp_path, monkeypatch):
    from dreambench.errors import UserError
    from dreambench.models import loading
    from dreambench.train import prepare, train

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(loading, "load_components", no_model)
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(b"PK\x03\x04 not a whole zip")
    for value, words in [(tmp_path / "nope.ckpt", "no such checkpoint file"), (torn, "not a complete checkpoint")]:
        cfg = compose(["+experiment=dog", *TINY, f"paths.run_dir={tmp_path / 'run'}", f"resume={value}"])
        with pytest.raises(UserError, match=words) as e:
            prepare(cfg)
        assert "\n" not in str(e.value) and f"resume={value}" in str(e.value)
        with pytest.raises(UserError):
            train(cfg)


# The same guarantee for the other model families and methods (docs/FAMILIES.md): SDXL with both text encoders
# trained (pooled embeddings and time ids built every step), and textual inversion, whose frozen embedding rows
# are copied back after each step (seen failing when the copy ran after the checkpoint was taken: the resumed
# run's first step read rows that weight decay had moved).
VARIANTS = {"sdxl": ("model=tiny_sdxl", "model.train_text_encoder=true"),
            "textual_inversion": ("method=textual_inversion",),
            "flux_lora": ("model=tiny_flux", "method=lora")}  # rectified flow: σ drawn from the run's generator


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_interrupted_and_resumed_run_of_other_families_and_methods_is_bitwise_identical(variant, tmp_path,
                                                                                        monkeypatch):
    from dreambench.train import train
    extra = VARIANTS[variant]
    assert train(compose([*COMMON, *extra, f"paths.run_dir={tmp_path / 'full'}"]))["steps"] == N
    full, full_rows = _final(tmp_path / "full"), _rows(tmp_path / "full")
    assert _interrupted_then_resumed(tmp_path / "run", monkeypatch, extra)["steps"] == N
    part = _final(tmp_path / "run")
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "dreambench_rng"):
        assert equal(part[key], full[key]), key
    assert _rows(tmp_path / "run") == full_rows
