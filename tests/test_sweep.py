"""End to end: `python -m dreambench.train -m +hparams_search=lr_prior` training the tiny model, resumed, with a
failing trial, compared from the sweep folder alone; the submitit launcher's local mode; the pruning callback."""

from __future__ import annotations

import json
import os
import shutil

import lightning as L
import optuna
import pytest
import torch
from optuna.trial import TrialState
from sweep_helpers import TINY_TRIAL, journal_study, run

from analysis.compare import compare
from dreambench.sweep.objective import Objective
from dreambench.sweep.trial import TrialPruning


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep-runs")
    # 3 trials from the sampler after one enqueued with a learning rate that blows the weights up: the trial
    # fails on a non-finite loss (a trial failure, counted; a config error would stop the sweep instead).
    args = [*TINY_TRIAL, f"paths.output_dir={out}", "hydra.sweeper.n_trials=4", "hydra.sweeper.max_failure_rate=0.5",
            "hydra.sweeper.enqueue=[{optimizer.lr:1e30,prior.weight:1.0}]"]
    r = run(args)
    assert r.returncode == 0, r.stderr[-4000:]
    return out / "sweeps" / "dog_lr_prior", args


@pytest.mark.slow
def test_sweep_completes_resumes_and_records_failure(sweep_dir):
    folder, args = sweep_dir
    study = journal_study(folder / "study.journal", "dog_lr_prior")
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    assert trials[0].user_attrs["fail_reason"].startswith("NonFiniteError: "), trials[0].user_attrs
    for t in trials[1:]:  # the storage holds what the run folders hold
        metrics = json.loads((folder / f"trial_{t.number}" / "metrics.json").read_text())
        assert t.value == metrics["train/loss_instance"] and metrics["steps"] == 6
        assert t.user_attrs["run_dir"] == str(folder / f"trial_{t.number}")
        cfg = (folder / f"trial_{t.number}" / "config.yaml").read_text()
        assert f"lr: {t.params['optimizer.lr']}" in cfg and f"weight: {t.params['prior.weight']}" in cfg
    assert len({t.params["optimizer.lr"] for t in trials}) == 4

    # The same command again: the study is at its target, nothing runs.
    again = run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(journal_study(folder / "study.journal", "dog_lr_prior").trials) == 4
    # A higher target adds the difference only; here run by the submitit launcher's local mode, two trials at
    # once as two processes (neither of them the sweeper).
    more = run([*args, "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=2", "hydra/launcher=submitit_local",
                "hydra.launcher.timeout_min=10"])
    assert more.returncode == 0, more.stderr[-3000:]
    trials = journal_study(folder / "study.journal", "dog_lr_prior").trials
    assert len(trials) == 6 and [t.state for t in trials[4:]] == [TrialState.COMPLETE] * 2
    assert all(t.params not in [u.params for u in trials[:4]] for t in trials[4:])  # a resumed sampler moves on
    pids = {t.user_attrs["pid"] for t in trials[4:]}
    assert len(pids) == 2 and os.getpid() not in pids and trials[1].user_attrs["pid"] not in pids
    assert list((folder / ".submitit").iterdir())
    assert sorted(p.name for p in folder.glob("trial_*")) == [f"trial_{i}" for i in range(6)]


@pytest.mark.slow
def test_compare_from_the_sweep_folder_alone(sweep_dir, tmp_path):
    folder, _ = sweep_dir
    copy = tmp_path / "moved"  # only the folder: absolute paths recorded in the storage no longer exist
    shutil.copytree(folder, copy)
    res = compare(copy)
    out = copy / "compare"
    rows = {r.name: r for r in res["rows"]}
    study = journal_study(copy / "study.journal", "dog_lr_prior")
    best = study.best_trial
    assert [r.name for r in res["front"]] == [f"trial_{best.number}"]
    header, *body = (out / "trials.csv").read_text().splitlines()
    assert header.split(",")[:4] == ["trial", "state", "optimizer.lr", "prior.weight"]
    assert len(body) == len(study.trials)
    assert rows["trial_0"].state == "FAIL" and "non-finite loss" in rows["trial_0"].reason
    for t in study.trials:
        if t.state == TrialState.COMPLETE:
            assert rows[f"trial_{t.number}"].metrics["train/loss_instance"] == t.value
            assert rows[f"trial_{t.number}"].wall_time_s > 0
    md = (out / "trials.md").read_text()
    assert md.startswith("| trial | state |") and md.count("\n") == len(study.trials) + 2
    assert f"trial_{best.number}" in (out / "best.md").read_text()
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["loss_curves.png", "train_loss_instance_vs_optimizer_lr.png",
                     "train_loss_instance_vs_prior_weight.png"]
    from PIL import Image
    assert all(Image.open(out / n).size[0] > 200 for n in names)


class _Falling(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        loss = (self.w ** 2).sum()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(20, 1), batch_size=1)


def test_pruning_callback_stops_a_trial_in_a_real_trainer(tmp_path):
    study = optuna.create_study(direction="minimize", pruner=optuna.pruners.ThresholdPruner(upper=0.5))
    trial = study.ask()
    cb = TrialPruning(trial, Objective.build("train/loss", "minimize"), tmp_path)
    trainer = L.Trainer(max_steps=20, callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(optuna.TrialPruned, match="train/loss"):
        trainer.fit(_Falling())
    reported = study.trials[0].intermediate_values
    # The first report (loss 1.0 > upper=0.5) prunes: training stops there, not at max_steps.
    assert 0 < len(reported) < 20 and max(reported.values()) > 0.5
    assert json.loads((tmp_path / "pruned.json").read_text())["step"] == trainer.global_step
    with pytest.raises(AssertionError):
        TrialPruning(trial, Objective.build(["a", "b"], ["maximize", "maximize"]))
