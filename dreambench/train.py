"""`python -m dreambench.train +experiment=dog`: one composed config in, one run folder out.

    <run>/config.yaml     the resolved config (secrets redacted)
    <run>/metrics.json    final losses, steps, wall time, identifier, class-image cache
    <run>/samples/        fixed-seed sample grids (step 0, every N steps, end); before_after.png: first beside last
    <run>/model/          the tuned pipeline, diffusers format, safetensors
    <run>/checkpoints/    trainable weights + optimizer state (+ RNG), for resuming
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
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
    resume: Path | None = None  # the checkpoint to continue from (resume=auto|path, checked here)
    memory: Any = None  # dreambench.memory.MemoryEstimate (None: memory.plan=false or not plannable)


def prepare(cfg: DictConfig) -> Plan:
    from dreambench.memory import plan_for
    from dreambench.models.loading import config_source
    from dreambench.resilience import resolve_resume
    from dreambench.resilience.runs import run_dir_for_this_rank, warn_changed_settings

    check_missing(cfg, " (a DreamBench subject comes with +experiment=<subject>, e.g. +experiment=dog)")
    validate_config(cfg)
    run_dir = run_dir_for_this_rank(cfg.paths.run_dir)
    with _user_errors():
        resume = resolve_resume(cfg.get("resume"), run_dir)
        if resume is not None:
            warn_changed_settings(resume, cfg)
    subject, instance_paths, prior, ref = check_inputs(cfg)
    with _user_errors():
        # Peak-memory estimate from the model's configs on the meta device; stops here if it cannot fit.
        from hydra.utils import instantiate
        memory = plan_for(cfg, config_source(ref, cfg.model.get("single_file_config")), instantiate(cfg.method))
    return Plan(cfg, run_dir, instance_paths, prior, ref, subject, resume, memory=memory)


def model_options(cfg: DictConfig) -> dict[str, Any]:
    """The family's loading switches (load_components' `options`)."""
    return {"t5": bool(cfg.model.get("t5", True))}


def validate_config(cfg: DictConfig) -> None:
    from hydra.utils import get_class

    from dreambench.models.families import get_family
    from dreambench.schema import validate
    validate(cfg)  # unknown keys, types, ranges (resolution a multiple of 8, lr > 0, ...): one UserError line
    # A method the model family does not have (e.g. textual inversion on SDXL, not yet): one line, before loading.
    family = get_family(cfg.model.get("family"))
    family.check_method(get_class(cfg.method._target_).name)
    family.check_config(cfg)


def check_inputs(cfg: DictConfig) -> tuple[Any, list[Path], Any, str]:
    """The subject, its photos, the class-image source and the model reference, each checked: (subject,
    instance photos, prior, model reference). Reads files; writes nothing outside the cache."""
    from hydra.utils import instantiate

    from dreambench.data import dreambench as db
    from dreambench.data.images import validate_image_folder
    from dreambench.models.loading import ModelNotFoundError, check_model_ref, resolve_model_ref

    res = int(cfg.data.resolution)
    with _user_errors():
        subject = None
        if cfg.data.instance_dir:
            folder = Path(cfg.data.instance_dir).expanduser()
            subject = db.custom_subject(str(cfg.data.subject), str(cfg.data.class_noun), bool(cfg.data.live),
                                        folder, cfg.paths.dataset_dir)
        else:
            subject = db.subject(db.resolve_root(cfg.paths.dataset_dir), cfg.data.subject)
            folder = subject.folder
        instance_paths = validate_image_folder(folder, min_size=int(cfg.data.get("min_size", res)),
                                               on_bad=cfg.data.on_bad_image, what="instance images",
                                               policy_key="data.on_bad_image")
        prior = instantiate(cfg.prior)
        prior.check(res)
        check_exports(cfg)
        check_parallel(cfg)
        check_metric_encoders(cfg)
        ref = resolve_model_ref(cfg.model, cfg.paths.cache_dir)
        try:
            check_model_ref(ref, cfg.model.revision, cfg.model.get("single_file_config"),
                            bool(cfg.model.allow_pickle))
        except ModelNotFoundError as e:
            if not cfg.model.get("build_command"):
                raise
            raise ModelNotFoundError(f"{e}; this model is built by the project, once: "
                                     f"{cfg.model.build_command}") from None
    return subject, instance_paths, prior, ref


def check_metric_encoders(cfg: DictConfig) -> None:
    """With the drift monitor on (train.drift.every_n_steps > 0, as sweeps set it), its DINO and CLIP encoders
    must be there: a local folder, a hub id in the cache or reachable, or tiny ones built on first use."""
    from dreambench.models.loading import ModelNotFoundError, reachable

    drift = OmegaConf.select(cfg, "train.drift.every_n_steps")
    if not drift or int(drift) <= 0:
        return
    for name in ("dino", "clip"):
        node = OmegaConf.select(cfg, f"metrics.{name}")
        if node is None or node.get("tiny"):
            continue
        ref = str(node.get("name_or_path") or "")
        why = reachable(ref, "config.json")
        if why:
            raise ModelNotFoundError(
                f"metrics.{name}.name_or_path={ref}: {why}; the drift monitor (train.drift.every_n_steps={drift}) "
                f"scores with it" + (" (with model=tiny use metrics=tiny: tiny encoders built on first use)"
                                     if str(cfg.model.get("name", "")) == "tiny" else ""))


def preflight(cfg: DictConfig) -> None:
    """A sweep's check of its trials' config, once before any trial (hydra.sweeper.preflight): the mistakes
    every trial would make (keys, values, data set, photos, class images, model) raise UserError here."""
    check_missing(cfg, " (a DreamBench subject comes with +experiment=<subject>, e.g. +experiment=dog)")
    validate_config(cfg)
    check_inputs(cfg)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """The library's errors about the user's input, as UserError (one line, exit 2)."""
    from dreambench.data import dreambench as db
    from dreambench.data.images import BadImageError
    from dreambench.models.loading import ModelNotFoundError
    try:
        yield
    except (db.DatasetNotFoundError, BadImageError, ModelNotFoundError, FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    except KeyError as e:  # unknown subject
        raise UserError(e.args[0]) from None


def check_exports(cfg: DictConfig) -> None:
    """train.export names formats that exist and apply to the method, before any model loads."""
    from hydra.utils import get_class

    from dreambench.exporters import choose_formats

    formats = list(cfg.train.get("export") or [])
    if formats:
        choose_formats(formats, get_class(cfg.method._target_).name, str(cfg.model.get("family") or "sd"))
    if formats and formats != ["diffusers"] and not cfg.train.export_model:
        raise UserError(f"train.export={formats} needs train.export_model=true (the exports are made from model/)")


def check_parallel(cfg: DictConfig) -> None:
    """trainer=fsdp: what a sharded run cannot do, in one message, before any model loads."""
    from dreambench.parallel import fsdp_problems, uses_fsdp
    if uses_fsdp(cfg):
        problems = fsdp_problems(cfg)
        if problems:
            raise UserError("trainer=fsdp cannot run these settings:\n  " + "\n  ".join(problems))


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one subject as `cfg` says; returns what metrics.json holds ({"finished": True, ...} when resume=auto
    finds the run finished and leaves it as it is)."""
    from dreambench.resilience import lock
    from dreambench.resilience.checkpoint import finished_and_left_alone
    from dreambench.resilience.runs import launch_rank, run_dir_for_this_rank

    run_dir = run_dir_for_this_rank(cfg.paths.run_dir)
    try:
        if launch_rank() == 0:  # before anything is read or written; DDP children share rank 0's lock
            lock.acquire(run_dir)
        steps = finished_and_left_alone(cfg.get("resume"), run_dir)
        if steps is not None:  # e.g. a requeued job that had already finished: not touched
            return {"finished": True, "steps": steps, "run_dir": str(run_dir)}
        return _train(cfg)
    finally:
        lock.release(run_dir)


def _train(cfg: DictConfig) -> dict[str, Any]:
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dreambench.callbacks.samples import SampleGrid
    from dreambench.data.identifier import resolve_identifier
    from dreambench.models.loading import describe, load_components
    from dreambench.module import DreamBoothModule
    from dreambench.resilience import AtomicCheckpointIO, NumericsGuard, Preemption, checkpoint_step
    from dreambench.resilience.runs import (
        RUN_DIR_ENV,
        FlushLoggersOnCheckpoint,
        continue_csv_logs,
        launch_rank,
        redacted_argv,
    )
    from dreambench.utils.io import atomic_dir, atomic_write_json, atomic_write_text

    t_start = time.time()
    plan = prepare(cfg)
    run_dir = plan.run_dir
    from dreambench.utils.threads import configure_threads, ranks_on_this_node
    threads, why = configure_threads(cfg.get("threads"), ranks_on_this_node(cfg.trainer))
    log.info("torch threads: %d (%s; set threads=N to choose)", threads, why)
    plain = to_container(cfg)
    if launch_rank() == 0:  # DDP children write nothing to the run folder
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(plain)))

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    comps = load_components(plan.model_ref, cfg.model.revision, cfg.model.variant, bool(cfg.model.allow_pickle),
                            cfg.model.prediction_type, cfg.model.get("single_file_config"),
                            family=str(cfg.model.get("family") or "sd"), options=model_options(cfg))
    log.info("model %s: %s", plan.model_ref, describe(comps))
    identifier = resolve_identifier(str(cfg.data.identifier), comps.tokenizer, int(cfg.seed))
    method = instantiate(cfg.method)
    identifier = method.identifier_token(identifier)  # e.g. "<sks>": textual inversion's new token
    log.info("identifier %r", identifier)
    module = DreamBoothModule(comps, cfg, plan.instance_paths, plan.prior, identifier, method, plan.subject)

    loggers = [instantiate(cfg.logger)] if cfg.get("logger") else []
    every_ckpt = int(cfg.train.checkpoint_every_n_steps)
    ckpt_dir = run_dir / "checkpoints"
    preemption = Preemption(ckpt_dir)
    # Preemption first: its signal handlers are in place before the step-0 sample grid appears.
    callbacks: list[Any] = [preemption, SampleGrid(run_dir / "samples", int(cfg.train.sample_every_n_steps),
                                                   seeds=list(cfg.train.sample_seeds),
                                                   cache_dir=cfg.train.get("sample_cache_dir")),
                            NumericsGuard(str(cfg.train.get("on_nonfinite", "stop"))), FlushLoggersOnCheckpoint()]
    if every_ckpt > 0:
        # save_top_k=-1: AtomicCheckpointIO prunes (after the new file is complete), preemption checkpoints too.
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="step={step:06d}", auto_insert_metric_name=False,
                                         every_n_train_steps=every_ckpt, save_top_k=-1))
    plugins: list[Any] = [AtomicCheckpointIO(keep=int(cfg.train.keep_checkpoints))]
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    if SLURMEnvironment.detect():  # Lightning's requeue saves inside its signal handler: see resilience/preempt.py
        plugins.append(SLURMEnvironment(auto_requeue=False))
    if cfg.progress:  # "training 60/120 ... loss: 0.12", not Lightning's "Epoch 0/-2 ... v_num: lvq4"
        from dreambench.callbacks.progress import progress_bar
        callbacks.append(progress_bar())
    if not cfg.train.get("samples", True):  # train.samples=false: no grids at all, not even at start and end
        callbacks = [c for c in callbacks if not isinstance(c, SampleGrid)]
    drift = cfg.train.get("drift")
    if drift and int(drift.every_n_steps) > 0:  # val/* during training: what sweeps optimise and prune on
        from dreambench.callbacks.drift import DriftMonitor
        callbacks.append(DriftMonitor(**OmegaConf.to_container(drift, resolve=True), metrics=cfg.metrics))
    if _sweep_trial(cfg):  # one trial of an Optuna sweep: record it, prune it (dreambench/sweep/trial.py)
        from dreambench.sweep.trial import trial_callbacks
        callbacks += trial_callbacks(cfg, run_dir)
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=str(run_dir),
                          enable_checkpointing=True, enable_progress_bar=bool(cfg.progress), plugins=plugins)
    if plan.resume is not None:
        step = checkpoint_step(plan.resume)
        if step is None:
            import torch
            step = int(torch.load(plan.resume, map_location="cpu", mmap=True, weights_only=True)["global_step"])
        continue_csv_logs(loggers, step, int(cfg.trainer.get("log_every_n_steps") or 50))
    with redacted_argv():  # W&B records sys.argv in its run metadata: no secret given as an override goes there
        for lg in loggers:
            lg.log_hyperparams(plain)
    try:
        t_fit = time.time()
        # Lightning's DDP launcher starts the other ranks inside fit(); they take the run folder from here.
        os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
        if int(cfg.trainer.max_steps) > 0:
            trainer.fit(module, ckpt_path=str(plan.resume) if plan.resume else None)
        else:  # Table 1's untrained row (conf/recipe/table1_untrained.yaml): a run folder like any other
            log.info("trainer.max_steps=0: no training step; the run's model is the base model as it is")
        fit_s = time.time() - t_fit
        metrics: dict[str, Any] = {}
        if preemption.preempted:  # a checkpoint, no export and no metrics.json: the run is not finished
            return {"preempted": True, "checkpoint": str(preemption.checkpoint), "steps": int(trainer.global_step),
                    "run_dir": str(run_dir), "rank": trainer.global_rank}
        from dreambench import parallel
        if parallel.is_sharded(trainer) and int(cfg.trainer.max_steps) > 0:
            parallel.gather_trained(module, trainer.global_rank)  # every rank: the weights, whole, on rank 0
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
                "memory_plan": plan.memory.summary() if plan.memory else None,
                "run_dir": str(run_dir),
            }
            atomic_write_json(run_dir / "metrics.json", metrics)
            if cfg.train.export_model:  # formats beyond model/ read the run folder just written
                from dreambench.exporters import export_run
                export_run(run_dir, [f for f in cfg.train.export if f != "diffusers"])
            from dreambench.card import write_card
            write_card(run_dir)
            for lg in loggers:
                lg.log_metrics({f"final/{k}": v for k, v in cm.items()}, step=int(trainer.global_step))
        return metrics
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
        for lg in loggers:
            if hasattr(lg, "experiment") and lg.__class__.__name__ == "WandbLogger":
                import wandb
                if wandb.run is not None:
                    wandb.finish()


def _sweep_trial(cfg: DictConfig) -> bool:
    return OmegaConf.select(cfg, "sweep.trial") is not None


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from dreambench.resilience import RESUMABLE_EXIT_CODE, NonFiniteError
    from dreambench.resilience.preempt import requeue_slurm
    from dreambench.resilience.runs import launch_rank

    if launch_rank() > 0:  # a DDP child: its Hydra log file (delay=True, see hydra_redact) is never opened
        for h in list(logging.getLogger().handlers):
            if isinstance(h, logging.FileHandler):
                logging.getLogger().removeHandler(h)
    logging.basicConfig(level=logging.INFO, format="[dreambench] %(message)s")
    from dreambench.utils.logs import library_progress_bars, route_library_logs_to_root
    route_library_logs_to_root()
    library_progress_bars(bool(cfg.progress))
    try:
        metrics = train(cfg)
    except UserError as e:
        if _sweep_trial(cfg):  # the sweeper records it as this trial's failure reason and goes on
            raise
        print(f"dreambench: error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        if _sweep_trial(cfg):  # a failed trial, with this reason; the sweep goes on
            raise
        print(f"dreambench: error: {e}", file=sys.stderr)
        sys.exit(4)
    if metrics.get("finished"):
        print(f"dreambench: run folder {metrics['run_dir']} is finished ({metrics['steps']} steps): resume=auto "
              f"leaves it as it is (to train on, resume=<its checkpoint> into another hydra.run.dir)",
              file=sys.stderr)
        return None
    if metrics.get("preempted"):
        requeued = launch_rank() == 0 and requeue_slurm()
        print(f"dreambench: preempted at step {metrics['steps']}: checkpoint {metrics['checkpoint']}; "
              f"{'requeued; ' if requeued else ''}run again with resume=auto hydra.run.dir={metrics['run_dir']} "
              f"to continue (exit code {RESUMABLE_EXIT_CODE})", file=sys.stderr)
        sys.exit(RESUMABLE_EXIT_CODE)
    if metrics.get("run_dir"):
        print(f"dreambench: run folder: {metrics['run_dir']}")
    key = cfg.get("optimized_metric")
    if not key or not _sweep_trial(cfg):
        return metrics.get(key) if isinstance(key, str) else None
    from dreambench.sweep.objective import pick
    return pick(metrics, key)  # one float per key; a missing key fails the trial with the keys it has


if __name__ == "__main__":
    from dreambench.cli import run
    run(main)
