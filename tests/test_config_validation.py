"""Config validation at start-up: unknown keys (also inside experiment files), missing values, bad values, each
named, in one UserError line, before any model loads; and no false alarm on any shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CONF, TINY, compose, run_cli


@pytest.fixture
def no_model_loads(monkeypatch):
    from dreambench.models import loading

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the config was checked")
    monkeypatch.setattr(loading, "load_components", refuse)
    monkeypatch.setattr(loading, "resolve_model_ref", refuse)


def _error(overrides: list[str], tmp_path: Path) -> str:
    from dreambench.errors import UserError
    from dreambench.train import prepare
    with pytest.raises(UserError) as e:
        prepare(compose(["+experiment=dog", *TINY, f"paths.run_dir={tmp_path / 'run'}", *overrides]))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("override,words", [
    ("optimizer.lr=-1e-5", "optimizer.lr=-1e-05 must be > 0"),
    ("prior.weight=-0.5", "prior.weight=-0.5 must be >= 0"),
    ("model.resolution=36", "data.resolution=36 must be a positive multiple of 8"),
    ("data.batch_size=0", "data.batch_size=0 must be >= 1"),
    ("data.on_bad_image=ignore", "data.on_bad_image='ignore' must be error or skip"),
    ("train.on_nonfinite=ignore", "train.on_nonfinite='ignore' must be stop or skip"),
    ("trainer.precision=16-true", "trainer.precision='16-true' must be"),
    ("trainer.max_steps=-1", "trainer.max_steps=-1 must be >= 0"),  # 0: the untrained row
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0 must be >= 1"),
    ("data.hflip=maybe", "data.hflip='maybe' should be bool"),
    ("guidance.num_inference_steps=2.5", "guidance.num_inference_steps=2.5 should be int"),
    ("+data.subjct=dog", "unknown key data.subjct (did you mean data.subject?)"),
    ("+optimizer.betas2=1", "unknown key optimizer.betas2"),
    ("+trainer.max_step=5", "unknown key trainer.max_step (did you mean trainer.max_steps?)"),
    ("+sed=1", "unknown key sed (did you mean seed?)"),
    ("prior.num_images=1000000000", "prior.num_images=1000000000 at 32px needs"),  # more than the disk holds
    # the training toolbox (docs/TOOLBOX.md)
    ("loss.min_snr_gamma=-1", "loss.min_snr_gamma=-1 must be >= 0"),
    ("loss.noise_offset=-0.1", "loss.noise_offset=-0.1 must be >= 0"),
    ("loss.input_perturbation=-1", "loss.input_perturbation=-1 must be >= 0"),
    ("loss.min_snr_gamma=five", "loss.min_snr_gamma='five' should be"),
    ("+loss.min_snr=5", "unknown key loss.min_snr (did you mean loss.min_snr_gamma?)"),
    ("model.zero_terminal_snr=maybe", "model.zero_terminal_snr='maybe' should be bool"),
    ("guidance.guidance_rescale=1.5", "guidance.guidance_rescale=1.5 must be in [0, 1]"),
    ("train.ema.decay=1.5", "train.ema.decay=1.5 must be in [0, 1]"),
    ("train.ema.every_n_steps=0", "train.ema.every_n_steps=0 must be >= 1"),
    ("train.ema.device=gpu", "train.ema.device='gpu' must be same or cpu"),
    ("train.ema.enabled=yes", "train.ema.enabled='yes' should be bool"),
    ("+train.ema.decy=0.9", "unknown key train.ema.decy (did you mean train.ema.decay?)"),
    ("loss.mask=maybe", "loss.mask='maybe' should be bool"),
    ("data.captions=maybe", "data.captions='maybe' should be bool"),
    ("data.buckets=maybe", "data.buckets='maybe' should be bool"),
    ("data.caption_dropout=1.0", "data.caption_dropout=1.0 must be in [0, 1)"),
    ("train.val_loss.every_n_steps=-1", "train.val_loss.every_n_steps=-1 must be >= 0"),
    ("train.val_loss.holdout=-1", "train.val_loss.holdout=-1 must be >= 0"),
    ("train.val_loss.timesteps=0", "train.val_loss.timesteps=0 must be >= 1"),
    ("train.val_loss.class_images=2", "train.val_loss.class_images=2 must be < prior.num_images=2"),
])
def test_bad_value_is_named_before_any_model_loads(override, words, tmp_path, no_model_loads):
    assert words in _error([override], tmp_path)


def test_all_problems_are_reported_together(tmp_path, no_model_loads):
    msg = _error(["optimizer.lr=-1", "+data.subjct=dog", "prior.weight=-1", "data.batch_size=abc",
                  "model.text_encoder_lr=1"], tmp_path)
    assert msg.startswith("invalid config: ")
    assert msg.count("data.batch_size") == 1 and "text_encoder_lr" not in msg  # an int is a fine float
    for key in ("optimizer.lr", "data.subjct", "prior.weight"):
        assert key in msg


def test_missing_values_are_named(tmp_path, no_model_loads):
    from dreambench.errors import UserError
    from dreambench.train import prepare
    with pytest.raises(UserError, match="data.subject.*\\+experiment=") as e:
        prepare(compose([*TINY, f"paths.run_dir={tmp_path}"]))
    assert "data.class_noun" in str(e.value)
    with pytest.raises(UserError, match="prior.folder"):
        prepare(compose(["+experiment=dog", "model=tiny", "prior=folder", f"paths.run_dir={tmp_path}"]))


def _typo_experiment(root: Path) -> Path:
    (root / "experiment").mkdir(parents=True)
    (root / "experiment" / "typo_dog.yaml").write_text(
        "# @package _global_\n"
        "data:\n  subject: dog\n  class_noun: dog\n  live: true\n  hflipp: true\n"
        "trian:\n  keep_checkpoints: 3\n")
    return root


def test_unknown_keys_inside_an_experiment_file_are_caught(tmp_path, no_model_loads):
    # Hydra merges config files without struct checks: these two typos compose silently...
    extra = _typo_experiment(tmp_path / "conf")
    cfg = compose([f"hydra.searchpath=[file://{extra}]", "+experiment=typo_dog", *TINY, f"paths.run_dir={tmp_path}"])
    assert cfg.data.hflipp is True and "trian" in cfg
    # ...and are refused here.
    from dreambench.schema import problems
    found = problems(cfg)
    assert "unknown key data.hflipp (did you mean data.hflip?)" in found
    assert "unknown key trian (did you mean train?)" in found


def test_cli_reports_one_line_and_exits_2(tmp_path):
    extra = _typo_experiment(tmp_path / "conf")
    # (hydra/job_logging=disabled: our hydra config must not assume Hydra's default log handlers)
    r = run_cli("dreambench.train", [f"hydra.searchpath=[file://{extra}]", "+experiment=typo_dog", *TINY,
                                     f"hydra.run.dir={tmp_path / 'run'}", "hydra/job_logging=disabled"],
                timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("dreambench: error:")]
    assert len(lines) == 1 and "data.hflipp" in lines[0] and "trian" in lines[0]
    assert "Traceback" not in r.stderr


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_shipped_option_and_experiment_validates_clean(tmp_path):
    from dreambench.schema import problems
    base = ["+experiment=dog", f"paths.run_dir={tmp_path}"]
    combos = [[f"+experiment={e}", f"paths.run_dir={tmp_path}"] for e in _options("experiment")]
    for group in ("model", "method", "prior", "optimizer", "logger", "trainer", "guidance", "data", "paths"):
        combos += [[*base, f"{group}={o}"] for o in _options(group)]
    for group in ("preset", "recipe", "hparams_search"):  # `# @package _global_` files, appended with +
        combos += [[*base, f"+{group}={o}"] for o in _options(group)]
    for ov in combos:
        if "prior=folder" in ov:
            ov = [*ov, f"prior.folder={tmp_path}"]
        found = problems(compose(ov))
        if "optimizer=adamw8bit" in ov:  # bitsandbytes is an optional extra: named if it is missing
            import importlib.util
            if importlib.util.find_spec("bitsandbytes") is None:
                assert found == [("optimizer._target_=bitsandbytes.optim.AdamW8bit cannot be imported "
                                  "(a missing optional dependency?)")]
                continue
        assert found == [], (ov, found)


def test_schema_fields_exist_in_the_shipped_configs():
    """A schema field that no config declares would be a second, drifting source of truth."""
    import dataclasses

    from dreambench.schema import SCHEMAS, _declared
    for group, schema in SCHEMAS.items():
        declared = _declared(str(CONF), group)
        missing = {f.name for f in dataclasses.fields(schema)} - declared - {"min_size"}  # min_size: optional
        assert not missing, (group, missing)


def test_prior_folder_images_are_validated_up_front_like_instance_images(tmp_path, no_model_loads):
    """prior=folder goes through the same image validation (dreambench/data/images.py) at start-up."""
    from PIL import Image

    from dreambench.errors import UserError
    from dreambench.train import prepare
    folder = tmp_path / "class"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(folder / f"dog{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "tiny.png").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(folder / "small.png")  # below the 32 px training resolution
    (folder / ".DS_Store").write_bytes(b"\x00\x00")  # hidden: ignored, not an error
    base = ["+experiment=dog", "model=tiny", "prior=folder", f"prior.folder={folder}", f"paths.run_dir={tmp_path}"]
    with pytest.raises(UserError) as e:
        prepare(compose(base))
    msg = str(e.value)
    assert all(name in msg for name in ("broken.jpg", "tiny.png", "small.png")) and ".DS_Store" not in msg
    # skip: warns and goes on with the good images only
    from dreambench.prior import FolderPrior
    prior = FolderPrior(str(folder), on_bad_image="skip")
    prior.check(32)
    assert sorted(p.name for p in prior.paths) == ["dog0.png", "dog1.png"]
