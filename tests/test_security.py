"""Security: safetensors only unless asked, no trust_remote_code from config, no secret in a run folder or W&B,
deletes never leave their root."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from helpers import TINY, compose, run_cli

SECRET = "SECRET123-do-not-log"


@pytest.fixture(scope="module")
def pickle_only_model(tmp_path_factory) -> Path:
    from dreambench.models.tiny import build_tiny_pipeline
    folder = tmp_path_factory.mktemp("pickle-model") / "tiny-bin"
    build_tiny_pipeline(0).save_pretrained(folder, safe_serialization=False)
    import torch
    from safetensors.torch import load_file
    for st in list(folder.rglob("*.safetensors")):  # transformers 5 writes safetensors regardless: make it .bin
        torch.save(load_file(st), st.with_name("pytorch_model.bin"))
        st.unlink()
    assert list(folder.rglob("*.bin")) and not list(folder.rglob("*.safetensors"))
    return folder


def test_pickle_weights_are_refused_unless_allowed_with_a_warning(pickle_only_model, caplog):
    from dreambench.models.loading import ModelNotFoundError, load_components
    with pytest.raises(ModelNotFoundError, match="only safetensors weights are loaded; model.allow_pickle=true"):
        load_components(str(pickle_only_model))
    with caplog.at_level(logging.WARNING, logger="dreambench"):
        comps = load_components(str(pickle_only_model), allow_pickle=True)
    assert comps.unet is not None and "allow_pickle=true: pickle weight files may be loaded" in caplog.text


@pytest.mark.parametrize("override", ["+model.trust_remote_code=true", "+trust_remote_code=false",
                                      "+data.loader.trust_remote_code=true", "+logger.Trust_Remote_Code=1"])
def test_trust_remote_code_cannot_be_set_from_config(override, tmp_path):
    from dreambench.schema import problems
    found = problems(compose(["+experiment=dog", *TINY, f"paths.run_dir={tmp_path}", override]))
    key = override[1:].split("=")[0]
    assert any(f.startswith(f"{key} cannot be set from a config") for f in found), found


def test_hydra_files_are_written_redacted():
    from omegaconf import OmegaConf

    from dreambench.resilience.hydra_redact import redacted_hydra_files
    cfg = OmegaConf.create({"logger": {"settings": {"api_key": SECRET}, "name": "x"}, "hf_token": SECRET,
                            "hydra": {"overrides": {"task": [f"+logger.settings.api_key={SECRET}", "seed=1"],
                                                    "hydra": []},
                                      "job": {"override_dirname": f"+logger.settings.api_key={SECRET},seed=1"}}})
    files = redacted_hydra_files(cfg)
    assert all(SECRET not in text for text in files.values())
    assert "seed=1" in files["overrides.yaml"] and "name: x" in files["config.yaml"]
    assert "api_key=***" in files["hydra.yaml"]


def _grep(root: Path, needle: str) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and needle.encode() in p.read_bytes():
            hits.append(str(p.relative_to(root)))
    return hits


def test_refused_secret_override_leaves_no_trace(tmp_path):
    # CSVLogger takes no api_key: refused at start-up (exit 2), and Hydra's output folder still holds no secret.
    run = tmp_path / "run"
    r = run_cli("dreambench.train", ["+experiment=dog", *TINY, f"+logger.api_key={SECRET}", f"hydra.run.dir={run}"],
                timeout=300)
    assert r.returncode == 2 and "unknown key logger.api_key" in r.stderr, r.stderr[-2000:]
    assert SECRET not in r.stderr and SECRET not in r.stdout
    assert (run / ".hydra" / "overrides.yaml").is_file()
    assert _grep(run, SECRET) == []


@pytest.mark.slow
def test_secrets_reach_neither_the_run_folder_nor_wandb(tmp_path):
    run = tmp_path / "run"
    args = ["+experiment=dog", *[o for o in TINY if not o.startswith("logger")], "logger=wandb",
            "trainer.max_steps=2", "train.checkpoint_every_n_steps=2", f"+logger.settings.api_key={SECRET}",
            f"hydra.run.dir={run}"]
    r = run_cli("dreambench.train", args, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((run / "wandb").glob("offline-run-*/*.wandb")), "no offline W&B run"
    assert (run / "checkpoints" / "step=000002.ckpt").is_file() and (run / ".hydra" / "hydra.yaml").is_file()
    assert _grep(run, SECRET) == []
    assert "api_key: '***'" in (run / "config.yaml").read_text()


def test_class_image_cache_never_deletes_through_a_link(tmp_path):
    from PIL import Image

    from dreambench.prior.cache import ClassImageCache, ClassImageSpec
    cache = ClassImageCache(tmp_path / "cache")
    spec = ClassImageSpec(model={"ref": "x"}, prompt="a dog", negative_prompt="", scheduler="DDIMScheduler", count=2)
    precious = tmp_path / "my-photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"irreplaceable")
    cache.root.mkdir()
    cache.folder(spec).symlink_to(precious)  # a stale link where the cache wants to write
    with pytest.raises(ValueError, match="refusing to delete"):
        cache.get_or_create(spec, lambda prompts, seeds: [Image.new("RGB", (8, 8)) for _ in prompts], progress=False)
    assert (precious / "holiday.jpg").read_bytes() == b"irreplaceable"


@pytest.mark.parametrize("sweeper", ["basic", "optuna"])
def test_a_secret_given_to_a_multirun_reaches_no_file_and_no_console(tmp_path, sweeper):
    # The job is refused at start-up (CSVLogger takes no api_key), after the sweeper has written multirun.yaml and
    # the launcher has logged the job's overrides: both used to hold the secret in clear.
    out = tmp_path / "sweep"
    extra = ({"basic": ["seed=0,1"],
              "optuna": ["+hparams_search=lr_prior", "hydra.sweeper.n_trials=1", "hydra.sweeper.max_failure_rate=1",
                         "hydra.sweeper.sampler._target_=optuna.samplers.RandomSampler"]})[sweeper]
    r = run_cli("dreambench.train", ["-m", "+experiment=dog", *TINY, f"+logger.api_key={SECRET}",
                                     f"hydra.sweep.dir={out}", *extra], timeout=300)
    logs = r.stdout + r.stderr
    assert "unknown key logger.api_key" in logs, logs[-3000:]  # the job (or the sweep's preflight) refused it
    assert SECRET not in logs
    if sweeper == "basic":
        assert "logger.api_key=***" in logs  # the launcher's line is there, redacted
        assert "+logger.api_key=***" in (out / "multirun.yaml").read_text()
    else:  # dreambench's sweeper checks the trials' config before any trial: nothing is launched or written
        assert "checked before any trial" in logs and r.returncode == 2
        assert not list(out.glob("trial_*"))
    assert _grep(out, SECRET) == []
