"""Every config composes, the experiment files are the dataset's, and bad configs fail naming the key."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from dreambench.config import check_missing, redact, to_container
from dreambench.data.dreambench import load_index
from dreambench.errors import UserError
from helpers import CONF, compose

GROUPS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml"))
          for g in ["model", "data", "prior", "optimizer", "guidance", "trainer", "logger", "method"]}
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SUBJECTS = [e for e in EXPERIMENTS if not e.startswith(("table", "toy_"))]  # toy_*: tests/test_world.py


def test_there_is_one_experiment_per_dreambench_subject(dataset_root):
    assert set(load_index(dataset_root).classes) <= set(EXPERIMENTS)
    assert len(load_index(dataset_root).classes) == 30


@pytest.mark.parametrize("name", SUBJECTS)
def test_every_subject_experiment_composes_at_top_level(name, dataset_root):
    cfg = compose([f"+experiment={name}", "paths.run_dir=/tmp/x"])
    assert "experiment" not in cfg  # a missing `# @package _global_` would nest everything here
    index = load_index(dataset_root)
    assert cfg.data.subject == name
    assert cfg.data.class_noun == index.classes[name]
    assert cfg.data.live == (index.classes[name] in {"cat", "dog"})
    assert not OmegaConf.missing_keys(cfg)


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    overrides = ["+experiment=dog", f"{group}={option}", "paths.run_dir=/tmp/x"]
    if (group, option) == ("prior", "folder"):
        overrides.append("prior.folder=/tmp/classes")
    cfg = compose(overrides)
    # everything resolves (interpolations point at keys that exist)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_defaults_follow_the_paper():
    cfg = compose(["+experiment=dog", "paths.run_dir=/tmp/x"])
    assert cfg.optimizer.lr == 5e-6 and cfg.prior.weight == 1.0 and cfg.trainer.max_steps == 800
    assert cfg.data.batch_size == 1 and cfg.data.resolution == 512 and cfg.prior.num_images == 200
    assert cfg.model.name == "sd15" and cfg.prior._target_.endswith("GeneratedPrior")
    assert cfg.logger._target_.endswith("WandbLogger") and cfg.logger.offline is True


def test_sd21_is_v_prediction_at_768():
    cfg = compose(["+experiment=dog", "model=sd21", "paths.run_dir=/tmp/x"])
    assert cfg.model.prediction_type == "v_prediction" and cfg.data.resolution == 768


def test_missing_subject_is_named():
    cfg = compose(["paths.run_dir=/tmp/x"])
    with pytest.raises(UserError, match=r"data\.class_noun, data\.live, data\.subject"):
        check_missing(cfg)


def test_unknown_key_is_rejected_by_composition():
    from hydra.errors import ConfigCompositionException
    with pytest.raises(ConfigCompositionException, match="learning_rate"):
        compose(["+experiment=dog", "optimizer.learning_rate=1e-4"])


def test_secrets_are_redacted():
    out = redact({"logger": {"api_key": "abc", "project": "p"}, "db": [{"password": "x"}], "token": None})
    assert out == {"logger": {"api_key": "***", "project": "p"}, "db": [{"password": "***"}], "token": None}
    cfg = compose(["+experiment=dog", "paths.run_dir=/tmp/x", "+logger.api_key=SECRET123"])
    assert "SECRET123" not in str(to_container(cfg))
