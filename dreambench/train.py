"""`python -m dreambench.train +experiment=dog`: one composed config in, one run folder out.

    <run>/config.yaml     the resolved config (secrets redacted)
    <run>/metrics.json    final losses, steps, wall time, identifier, class-image cache
    <run>/samples/        fixed-seed sample grids (step 0, every N steps, end)
    <run>/model/          the tuned pipeline, diffusers format, safetensors
    <run>/checkpoints/    trainable weights + optimizer state (+ RNG), for resuming
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from dreambench.config import check_missing, to_container
from dreambench.errors import UserError

log = logging.getLogger("dreambench")


@dataclass
class Plan:
    """Everything checked before any model loads."""
    cfg: DictConfig
    run_dir: Path
    instance_paths: list[Path]
    prior: Any
    model_ref: str
    subject: Any


def prepare(cfg: DictConfig) -> Plan:
    from hydra.utils import instantiate

    from dreambench.data import dreambench as db
    from dreambench.data.images import BadImageError, validate_image_folder
    from dreambench.models.loading import ModelNotFoundError, check_model_ref, resolve_model_ref

    check_missing(cfg, " (a DreamBench subject comes with +experiment=<subject>, e.g. +experiment=dog)")
    res = int(cfg.data.resolution)
    if res <= 0 or res % 8:
        raise UserError(f"data.resolution={res} must be a positive multiple of 8")
    try:
        subject = None
        if cfg.data.instance_dir:
            folder = Path(cfg.data.instance_dir).expanduser()
        else:
            subject = db.subject(db.resolve_root(cfg.paths.dataset_dir), cfg.data.subject)
            folder = subject.folder
        instance_paths = validate_image_folder(folder, min_size=int(cfg.data.get("min_size", res)),
                                               on_bad=cfg.data.on_bad_image, what="instance images")
        prior = instantiate(cfg.prior)
        prior.check(res)
        ref = resolve_model_ref(cfg.model)
        check_model_ref(ref, cfg.model.revision)
    except (db.DatasetNotFoundError, BadImageError, ModelNotFoundError, FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    except KeyError as e:  # unknown subject
        raise UserError(e.args[0]) from None
    return Plan(cfg, Path(cfg.paths.run_dir), instance_paths, prior, ref, subject)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one subject as `cfg` says; returns what metrics.json holds."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dreambench.callbacks.samples import SampleGrid
    from dreambench.data.identifier import resolve_identifier
    from dreambench.models.loading import describe, load_components
    from dreambench.module import DreamBoothModule
    from dreambench.utils.io import atomic_dir, atomic_write_json, atomic_write_text

    t_start = time.time()
    plan = prepare(cfg)
    run_dir = plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    plain = to_container(cfg)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(plain)))

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    comps = load_components(plan.model_ref, cfg.model.revision, cfg.model.variant, bool(cfg.model.allow_pickle),
                            cfg.model.prediction_type)
    log.info("model %s: %s", plan.model_ref, describe(comps))
    identifier = resolve_identifier(str(cfg.data.identifier), comps.tokenizer, int(cfg.seed))
    method = instantiate(cfg.method)
    module = DreamBoothModule(comps, cfg, plan.instance_paths, plan.prior, identifier, method, plan.subject)

    loggers = [instantiate(cfg.logger)] if cfg.get("logger") else []
    every_ckpt = int(cfg.train.checkpoint_every_n_steps)
    callbacks: list[Any] = [SampleGrid(run_dir / "samples", int(cfg.train.sample_every_n_steps),
                                       seeds=list(cfg.train.sample_seeds))]
    if every_ckpt > 0:
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step={step:06d}",
                                         auto_insert_metric_name=False, every_n_train_steps=every_ckpt,
                                         save_top_k=int(cfg.train.keep_checkpoints), monitor="step", mode="max"))
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=str(run_dir),
                          enable_checkpointing=every_ckpt > 0, enable_progress_bar=bool(cfg.progress))
    for lg in loggers:
        lg.log_hyperparams(plain)
    try:
        t_fit = time.time()
        trainer.fit(module, ckpt_path=cfg.get("resume"))
        fit_s = time.time() - t_fit
        metrics: dict[str, Any] = {}
        if trainer.is_global_zero:
            if cfg.train.export_model:
                with atomic_dir(run_dir / "model") as tmp:
                    module.export(tmp)
            cm = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
            metrics = {
                **cm,
                "steps": int(trainer.global_step),
                "wall_time_s": round(time.time() - t_start, 2),
                "fit_time_s": round(fit_s, 2),
                "identifier": identifier,
                "instance_prompt": module.instance_prompt,
                "class_prompt": module.class_prompt,
                "subject": cfg.data.subject,
                "num_instance_images": len(plan.instance_paths),
                "method": method.summary(),
                "prior": {"weight": plan.prior.weight, **plan.prior.summary()},
                "model": plan.model_ref,
                "run_dir": str(run_dir),
            }
            atomic_write_json(run_dir / "metrics.json", metrics)
            for lg in loggers:
                lg.log_metrics({f"final/{k}": v for k, v in cm.items()}, step=int(trainer.global_step))
        return metrics
    finally:
        for lg in loggers:
            if hasattr(lg, "experiment") and lg.__class__.__name__ == "WandbLogger":
                import wandb
                if wandb.run is not None:
                    wandb.finish()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    logging.basicConfig(level=logging.INFO, format="[dreambench] %(message)s")
    try:
        metrics = train(cfg)
    except UserError as e:
        print(f"dreambench: error: {e}", file=sys.stderr)
        sys.exit(2)
    if metrics.get("run_dir"):
        print(f"dreambench: run folder: {metrics['run_dir']}")
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


if __name__ == "__main__":
    main()
