"""Resume at its edges: finished runs, runs without a checkpoint, logger=none, paths with `=`, changed settings."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose, run_cli

N = 4
COMMON = ["+experiment=dog", *TINY, f"trainer.max_steps={N}", f"train.checkpoint_every_n_steps={N}",
          "train.samples=false"]


def _files(run: Path) -> dict[str, bytes]:
    return {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    from dreambench.train import train
    run = tmp_path_factory.mktemp("finished") / "run"
    assert train(compose([*COMMON, f"paths.run_dir={run}"]))["steps"] == N
    return run


def test_resume_auto_leaves_a_finished_run_byte_identical(finished):
    from dreambench.train import train
    before = _files(finished)
    assert "metrics.json" in before and f"checkpoints/step={N:06d}.ckpt" in before
    out = train(compose([*COMMON, f"paths.run_dir={finished}", "resume=auto"]))
    assert out == {"finished": True, "steps": N, "run_dir": str(finished)}
    assert _files(finished) == before


def test_cli_resume_auto_on_a_finished_run_exits_0_with_one_line_and_writes_nothing(finished):
    before = _files(finished)
    r = run_cli("dreambench.train", [*COMMON, f"hydra.run.dir={finished}", "resume=auto"], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"dreambench: run folder {finished} is finished ({N} steps)" in r.stderr
    assert _files(finished) == before  # no .hydra/, no train.log line, no metrics.json rewrite


def test_a_fresh_run_into_a_finished_run_folder_is_refused_and_writes_nothing(finished):
    before = _files(finished)
    r = run_cli("dreambench.train", [*COMMON, f"hydra.run.dir={finished}"], timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    [line] = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert line == (f"dreambench: error: {finished} already holds a run (metrics.json, model/, checkpoints); a "
                    f"fresh run there would overwrite it: resume=auto continues it, or give the new run another "
                    f"folder (hydra.run.dir=...)"), r.stderr
    assert _files(finished) == before


def test_resume_auto_without_a_checkpoint_never_starts_afresh_over_a_trained_model(tmp_path):
    from dreambench.errors import UserError
    from dreambench.train import train
    run = tmp_path / "run"
    (run / "model" / "unet").mkdir(parents=True)
    (run / "model" / "model_index.json").write_text("{}")  # a trained model, and no checkpoints/ to continue
    before = _files(run)
    with pytest.raises(UserError, match="holds a trained model/ but no checkpoint") as e:
        train(compose(["+experiment=dog", *TINY, f"paths.run_dir={run}", "resume=auto"]))
    assert "\n" not in str(e.value)
    assert _files(run) == before


def test_logger_none_names_prunes_and_finds_checkpoints_like_any_logger(tmp_path):
    from dreambench.resilience.checkpoint import resolve_resume
    from dreambench.train import train
    run = tmp_path / "run"
    train(compose([*[o for o in COMMON if not o.startswith("logger")], "logger=none",
                   "train.checkpoint_every_n_steps=2", f"paths.run_dir={run}"]))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step={N:06d}.ckpt"]  # keep_checkpoints=1
    assert resolve_resume("auto", run) == run / "checkpoints" / f"step={N:06d}.ckpt"


def test_a_checkpoint_path_with_equals_signs_is_given_quoted_as_the_readme_shows(tmp_path):
    from dreambench.resilience.checkpoint import AtomicCheckpointIO, resolve_resume
    ckpt = tmp_path / "run" / "checkpoints" / "step=000300.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 300}, ckpt)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "resume=\"'experiments/dog/<time>/checkpoints/step=000300.ckpt'\"" in readme
    cfg = compose(["+experiment=dog", *TINY, f"resume='{ckpt}'"])  # what the shell hands over from "'...'"
    assert resolve_resume(cfg.resume, tmp_path / "elsewhere") == ckpt


def test_changed_learning_rate_or_prior_weight_on_resume_is_named(tmp_path, caplog):
    from omegaconf import OmegaConf

    from dreambench.config import to_container
    from dreambench.resilience.checkpoint import AtomicCheckpointIO
    from dreambench.train import prepare
    run = tmp_path / "run"
    base = ["+experiment=dog", *TINY, f"paths.run_dir={run}"]
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(to_container(compose(base)))))  # as train()
    ckpt = run / "checkpoints" / "step=000003.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 3, "w": torch.ones(1)}, ckpt)
    with caplog.at_level(logging.WARNING, logger="dreambench"):
        prepare(compose([*base, "resume=auto", "trainer.max_steps=9"]))
    assert "changed" not in caplog.text  # max_steps may change: that is how a run is extended
    with caplog.at_level(logging.WARNING, logger="dreambench"):
        prepare(compose([*base, "resume=auto", "optimizer.lr=2e-3", "prior.weight=0.5"]))
    assert "optimizer.lr 0.001 -> 0.002" in caplog.text and "prior.weight 1.0 -> 0.5" in caplog.text
