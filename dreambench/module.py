"""The DreamBooth LightningModule: wires the pure functions of `losses` to the model components."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from dreambench import losses, speed
from dreambench.data.latents import LatentBank, draw_indices
from dreambench.models.loading import Components
from dreambench.prior import PriorContext
from dreambench.resilience import checkpoint as resilience
from dreambench.resilience.numerics import keep_vae_fp32, vae_needs_fp32
from dreambench.sampling import build_pipeline, generate, make_scheduler

log = logging.getLogger("dreambench")


class DreamBoothModule(L.LightningModule):
    def __init__(self, components: Components, cfg: DictConfig, instance_paths: list[Path], prior: Any,
                 identifier: str, method: Any, subject: Any = None):
        super().__init__()
        # No save_hyperparameters: it would embed the modules in every checkpoint.
        self.unet, self.vae, self.text_encoder = components.unet, components.vae, components.text_encoder
        self.tokenizer = components.tokenizer
        self.noise_scheduler = components.noise_scheduler
        self.components = components
        self.run_cfg, self.prior, self.identifier, self.subject = cfg, prior, identifier, subject
        self.instance_paths = list(instance_paths)
        self.method = method
        self.train_text_encoder = bool(getattr(method, "train_text_encoder", False))
        fmt = dict(identifier=identifier, class_noun=cfg.data.class_noun)
        self.instance_prompt = " ".join(cfg.data.instance_prompt.format(**fmt).split())
        self.class_prompt = " ".join(cfg.data.class_prompt.format(**fmt).split())
        self.prediction_type = components.noise_scheduler.config.prediction_type
        self.register_buffer("alphas_cumprod", components.noise_scheduler.alphas_cumprod.clone(), persistent=False)

        self.vae.requires_grad_(False).eval()
        if vae_needs_fp32(cfg.model.get("vae_fp32", "auto"), cfg.trainer.get("precision"),
                          getattr(self.vae.config, "force_upcast", None)):
            keep_vae_fp32(self.vae)  # e.g. SDXL's VAE overflows in fp16 (NaN, black images)
        self.text_encoder.requires_grad_(False).eval()
        method.prepare(self)  # what is trained: UNet / text encoder / adapters / a token embedding
        if cfg.model.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()
        if cfg.model.attention == "eager":  # default diffusers processors use SDPA (torch >= 2)
            from diffusers.models.attention_processor import AttnProcessor
            self.unet.set_attn_processor(AttnProcessor())
        speed.apply_channels_last(self.unet, bool(cfg.model.get("channels_last", False)))
        self._first_step = speed.FirstStepClock()
        # Lightning restores checkpoints with only the trained weights (see on_save_checkpoint).
        self.strict_loading = False
        self.noise_generator: torch.Generator | None = None
        self._draw_tables: dict[tuple[int, int], torch.Tensor] = {}  # see _indices
        self._pending_rng: dict[str, Any] | None = None
        self.last_train_metrics: dict[str, float] = {}  # the losses last read back (_log_losses)

    # ---- set-up: class images, cached latents and text embeddings -------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit" or getattr(self, "instance_bank", None) is not None:
            return
        trainer = self.trainer
        device = trainer.strategy.root_device
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(device)
        cfg = self.run_cfg
        speed.cast_frozen(self, cfg.model.get("frozen_dtype", "auto"), str(cfg.trainer.precision), device)
        res = int(cfg.data.resolution)
        guidance = dict(cfg.guidance)
        ctx = PriorContext(
            class_prompt=self.class_prompt, resolution=res, guidance=guidance,
            model_identity=self.components.identity, scheduler_config=self.components.scheduler_config,
            make_render=lambda: self._render_fn(guidance), rank=trainer.global_rank,
            world_size=trainer.world_size, barrier=trainer.strategy.barrier,
            progress=trainer.is_global_zero and cfg.get("progress", True),
        )
        # Class images come from the base model: made here, before any step and before a checkpoint is
        # restored (Lightning restores after setup), so a resumed run never renders them from tuned weights.
        class_paths = self.prior.class_images(ctx)
        with self._precision():
            self.instance_bank = LatentBank.from_paths(self.vae, self.instance_paths, res, cfg.data.center_crop,
                                                       cfg.data.hflip)
            self.class_bank = (LatentBank.from_paths(self.vae, class_paths, res, cfg.data.center_crop, cfg.data.hflip)
                               if class_paths else None)
        self.instance_ids = self._tokenize(self.instance_prompt).to(device)
        self.class_ids = self._tokenize(self.class_prompt).to(device)
        if not self.train_text_encoder:  # frozen text encoder: embeddings once, not every step
            with torch.no_grad():
                self.instance_emb = self.text_encoder(self.instance_ids)[0].float()
                self.class_emb = self.text_encoder(self.class_ids)[0].float()
        # Noise and timesteps come from one generator per rank whose state travels in the checkpoint.
        self.noise_generator = torch.Generator(device=device).manual_seed(int(cfg.seed) * 1009 + trainer.global_rank)
        log.info("instance prompt %r, class prompt %r, %d instance / %d class latents", self.instance_prompt,
                 self.class_prompt, len(self.instance_bank), len(self.class_bank) if self.class_bank else 0)
        # After the class images: compiling for inference first would only add a recompile.
        speed.compile_unet(self.unet, bool(cfg.model.get("compile", False)))

    @property
    def real_images(self) -> list:
        """The subject's photos as RGB images (the drift monitor's references)."""
        if getattr(self, "_real_images", None) is None:
            from dreambench.data.images import load_image
            self._real_images = [load_image(p) for p in self.instance_paths]
        return self._real_images

    def _tokenize(self, prompt: str) -> torch.Tensor:
        return self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def _precision(self):
        try:
            return self.trainer.precision_plugin.forward_context()
        except RuntimeError:  # not attached to a trainer
            return contextlib.nullcontext()

    def _render_fn(self, guidance: dict[str, Any]):
        pipe = self.sampling_pipeline(guidance)
        batch = int(self.run_cfg.prior.get("batch_size", 4))

        def render(prompts: list[str], seeds: list[int]):
            with self._precision():
                return generate(pipe, prompts, seeds, guidance, batch_size=batch, progress=False)
        return render

    def sampling_pipeline(self, guidance: dict[str, Any] | None = None):
        g = dict(guidance or self.run_cfg.guidance)
        return build_pipeline(self.unet, self.vae, self.text_encoder, self.tokenizer,
                              make_scheduler(g["scheduler"], self.components.scheduler_config))

    # ---- training -----------------------------------------------------------------------------------------
    def _draw(self, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        cfg = self.run_cfg
        accum = max(1, int(self.trainer.accumulate_grad_batches))
        b = int(cfg.data.batch_size)
        micro = self.global_step * accum + batch_idx % accum
        base = (micro * self.trainer.world_size + self.trainer.global_rank) * b
        seed = int(cfg.seed)
        inst = self.instance_bank.sample(self._indices(len(self.instance_bank), seed, base, b),
                                         self.noise_generator)
        ids = [self.instance_ids] * b
        embs = [self.instance_emb] * b if not self.train_text_encoder else None
        latents = inst
        if self.class_bank is not None:
            cls = self.class_bank.sample(self._indices(len(self.class_bank), seed + 1, base, b),
                                         self.noise_generator)
            latents = torch.cat([inst, cls])  # one batch [instance; class], one forward pass (§3.3)
            ids += [self.class_ids] * b
            if embs is not None:
                embs += [self.class_emb] * b
        if embs is not None:
            cond = torch.cat(embs)
        else:
            cond = self.text_encoder(torch.cat(ids))[0]
        return latents, cond, b

    def _indices(self, n: int, seed: int, base: int, b: int) -> torch.Tensor:
        """draw_indices for positions base..base+b-1, sliced from the whole run's table, made once on the latents'
        device: a fresh index tensor copied from the host every step would block the step on a GPU (a sync)."""
        tables = self._draw_tables
        table = tables.get((n, seed))
        if table is None or base + b > len(table):
            accum = max(1, int(self.trainer.accumulate_grad_batches))
            total = max(base + b, (int(self.trainer.max_steps) + 1) * accum * self.trainer.world_size * b)
            table = torch.tensor(draw_indices(n, seed, range(total)), device=self.instance_bank.mean.device)
            tables[(n, seed)] = table
        return table[base:base + b]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        latents, cond, n_inst = self._draw(batch_idx)
        g = self.noise_generator
        noise = torch.randn(latents.shape, generator=g, device=latents.device, dtype=latents.dtype)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g,
                          device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        pred = self.unet(noisy, t, cond).sample
        target = losses.diffusion_target(self.prediction_type, latents, noise, t, self.alphas_cumprod)
        loss, loss_inst, loss_prior = losses.prior_preservation_loss(pred, target, n_inst, self.prior.weight)
        named = {"train/loss": loss, "train/loss_instance": loss_inst}
        if self.class_bank is not None:
            named["train/loss_prior"] = loss_prior
        self._log_losses(named, batch_idx)
        return loss

    def _log_losses(self, named: dict[str, torch.Tensor], batch_idx: int) -> None:
        """The step's losses to the loggers, on logging steps only, read back to the host in one transfer.

        Lightning's `self.log(on_step=True)` reads a progress-bar value back every step and each logged value
        separately (`.item()`) on logging steps: on a GPU each read stalls the host until the device drains.
        Here the losses are stacked and read once, on the steps Lightning would log (the one that completes
        step k is logged as k - 1, every `trainer.log_every_n_steps`; the CSV rows are Lightning's), and on the
        last step, whose values metrics.json, the progress bar and sweeps read from `trainer.callback_metrics`
        (CPU tensors: reading them costs the device nothing). Between them nothing leaves the device."""
        trainer = self.trainer
        accum = max(1, int(trainer.accumulate_grad_batches))
        if (batch_idx + 1) % accum:  # a micro-batch: the optimizer step (and its log) comes with the last one
            return
        step = int(trainer.global_step)  # updates done before this one
        log_now = (step + 1) % max(1, int(trainer.log_every_n_steps)) == 0
        if not log_now and step + 1 < int(trainer.max_steps):
            return
        flags = getattr(self, "_device_flags", None)  # NumericsGuard's, read in the same transfer
        stacked = torch.stack([v.detach().to(torch.float64) for v in named.values()])
        if flags is not None:
            stacked = torch.cat([stacked, flags.to(stacked.device, torch.float64)])
        values = speed.read_back(stacked)  # the one host sync
        if flags is not None:
            self._flags_read = (step + 1, values[len(named):])  # as of the update before this one
        metrics = dict(zip(named, values[:len(named)]))
        self.last_train_metrics = metrics
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if log_now and trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics({**metrics, "epoch": int(self.current_epoch)}, step=step)
                lg.save()

    def configure_optimizers(self):
        cfg = self.run_cfg
        groups = self.method.param_groups(self, float(cfg.optimizer.lr))
        params = [p for g in groups for p in g["params"]]
        optimizer = instantiate(cfg.optimizer, **speed.optimizer_kwargs(cfg.optimizer, params))(groups)
        speed.allow_clipping(optimizer)  # fused AdamW + mixed precision + clipping: see speed.allow_clipping
        from diffusers.optimization import get_scheduler
        sched = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=int(cfg.train.lr_warmup_steps),
                              num_training_steps=int(cfg.trainer.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        # Batches are drawn from the cached latents in training_step by global step (see _draw); the loader
        # only paces the loop. One epoch is the whole run.
        n = int(self.trainer.max_steps) * max(1, int(self.trainer.accumulate_grad_batches))
        return torch.utils.data.DataLoader(torch.arange(n), batch_size=None, shuffle=False)

    # ---- checkpoints hold what was trained ------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._first_step()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.method.after_optimizer_step(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.method.trained_prefixes(self)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(keep)}
        # Exact resume: python/numpy/torch global RNGs and the noise generator, of every rank.
        checkpoint["dreambench_rng"] = resilience.gather_rng(self.trainer, self.noise_generator)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs after setup() (Lightning restores after it), so the noise generator exists and the class images
        # and latents were made from the base model before the tuned weights came back.
        # The states are applied in on_train_start, after the callbacks' on_train_start (a step-0 sample grid of
        # the resumed run draws from the global torch RNG; the uninterrupted run made no grid at this step).
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self._pending_rng = resilience.rank_state(checkpoint.get("dreambench_rng"), rank)

    def on_train_start(self) -> None:
        if self._pending_rng is not None:
            resilience.restore_rng(self._pending_rng, self.noise_generator)
            self._pending_rng = None

    # ---- export --------------------------------------------------------------------------------------------
    def base_pipeline(self):
        """The in-memory components as a pipeline with the base model's own scheduler class."""
        import diffusers
        sched_cls = getattr(diffusers, self.components.scheduler_config.get("_class_name", "DDPMScheduler"))
        return build_pipeline(self.unet, self.vae, self.text_encoder, self.tokenizer,
                              sched_cls.from_config(self.components.scheduler_config))

    def export(self, folder: Path) -> None:
        """The method's artefact: a diffusers pipeline folder (dreambooth), adapter weights (lora), an
        embedding file (textual inversion)."""
        speed.restore_frozen(self)  # the base model's own fp32 VAE / text encoder, not a bf16 round trip
        self.method.export(self, folder)
