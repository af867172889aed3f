"""The DreamBooth LightningModule: wires the pure functions of `losses` to the model components."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dreambench import losses, speed
from dreambench.data.latents import LatentBank, draw_indices
from dreambench.models.families import cond_cat, cond_float, cond_take, cond_where, get_family
from dreambench.models.loading import Components
from dreambench.prior import PriorContext
from dreambench.resilience import checkpoint as resilience
from dreambench.resilience.numerics import keep_vae_fp32, vae_needs_fp32
from dreambench.sampling import generate, make_scheduler
from dreambench.schema import FlowSchema

log = logging.getLogger("dreambench")


class DreamBoothModule(L.LightningModule):
    def __init__(self, components: Components, cfg: DictConfig, instance_paths: list[Path], prior: Any,
                 identifier: str, method: Any, subject: Any = None):
        super().__init__()
        if cfg.model.get("zero_terminal_snr"):  # the training schedule and every sampler built from its config
            from dreambench.models.loading import with_zero_terminal_snr
            components = with_zero_terminal_snr(components)
        # No save_hyperparameters: it would embed the modules in every checkpoint.
        self.unet, self.vae, self.text_encoder = components.unet, components.vae, components.text_encoder
        self.tokenizer = components.tokenizer
        # The model family (SD 1.x/2.x, SDXL, SD 3.5, Flux): how prompts become conditioning, how the denoiser is
        # called, which pipeline samples and exports. The second and third text encoders and tokenizers where the
        # family has them (SDXL, SD 3.5, Flux; SD 3.5's T5 may be left out), else None.
        self.family = get_family(components.family).configured(cfg.model, components.unet)
        self.text_encoder_2, self.tokenizer_2 = components.text_encoder_2, components.tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = components.text_encoder_3, components.tokenizer_3  # SD3's T5
        self.noise_scheduler = components.noise_scheduler
        self.components = components
        self.run_cfg, self.prior, self.identifier, self.subject = cfg, prior, identifier, subject
        self.instance_paths = list(instance_paths)
        # Validation loss (train.val_loss): the last `holdout` photos (name order) are kept out of training for it.
        self.val_cfg = dict(cfg.train.get("val_loss") or {})
        k = int(self.val_cfg.get("holdout") or 0)
        self.val_paths: list[Path] = []
        if k:
            if k >= len(self.instance_paths):
                from dreambench.errors import UserError
                raise UserError(f"train.val_loss.holdout={k} would leave no photo to train on (the subject has "
                                f"{len(self.instance_paths)})")
            self.instance_paths, self.val_paths = self.instance_paths[:-k], self.instance_paths[-k:]
            log.info("validation loss: %d photo(s) held out of training: %s", k, [p.name for p in self.val_paths])
        self._val_last_step = -1
        self.val_class_paths: list[Path] = []
        self.val_set: dict[str, torch.Tensor] | None = None
        self.captioned = False  # data.captions / data.caption_dropout, see _setup_captions
        self.bucket_banks: list[LatentBank] | None = None  # data.buckets, see _setup_buckets
        self.method = method
        self.train_text_encoder = bool(getattr(method, "train_text_encoder", False))
        fmt = dict(identifier=identifier, class_noun=cfg.data.class_noun)
        self.instance_prompt = " ".join(cfg.data.instance_prompt.format(**fmt).split())
        self.class_prompt = " ".join(cfg.data.class_prompt.format(**fmt).split())
        if self.family.objective == "flow_matching":  # SD3: σ of each training timestep (the shifted schedule)
            self.prediction_type = "flow"
            self.flow_cfg = {**dataclasses.asdict(FlowSchema()), **dict(cfg.model.get("flow") or {})}
            # Flux: its scheduler's σ are unshifted (use_dynamic_shifting); family.shift_sigmas shifts them per size.
            self.register_buffer("flow_sigmas", components.noise_scheduler.sigmas.clone().float(), persistent=False)
        else:
            self.prediction_type = components.noise_scheduler.config.prediction_type
            self.register_buffer("alphas_cumprod", components.noise_scheduler.alphas_cumprod.clone(),
                                 persistent=False)

        self.vae.requires_grad_(False).eval()
        if vae_needs_fp32(cfg.model.get("vae_fp32", "auto"), cfg.trainer.get("precision"),
                          getattr(self.vae.config, "force_upcast", None)):
            keep_vae_fp32(self.vae)  # e.g. SDXL's VAE overflows in fp16 (NaN, black images)
        for te in self.text_encoders:
            te.requires_grad_(False).eval()
        method.prepare(self)  # what is trained: UNet / text encoder / adapters / a token embedding
        if cfg.model.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.train_text_encoder:
                for _, te in self.named_text_encoders(trainable=True):
                    te.gradient_checkpointing_enable()
        if cfg.model.attention == "eager":  # default diffusers processors use SDPA (torch >= 2)
            from diffusers.models.attention_processor import AttnProcessor
            self.unet.set_attn_processor(AttnProcessor())
        speed.apply_channels_last(self.unet, bool(cfg.model.get("channels_last", False)))
        self._first_step = speed.FirstStepClock()
        self._last_step = speed.FirstStepClock("last training step ended")
        # Lightning restores checkpoints with only the trained weights (see on_save_checkpoint).
        self.strict_loading = False
        self.noise_generator: torch.Generator | None = None
        self._draw_tables: dict[tuple[int, int], torch.Tensor] = {}  # see _indices
        self._pending_rng: dict[str, Any] | None = None
        # Loss switches (conf `loss`); absent keys (an old run's config) mean off.
        lc = dict(cfg.get("loss") or {})
        self.loss_cfg = {"min_snr_gamma": lc.get("min_snr_gamma"), "noise_offset": float(lc.get("noise_offset") or 0),
                         "input_perturbation": float(lc.get("input_perturbation") or 0),
                         "mask": bool(lc.get("mask", False))}
        # EMA of the trained weights (train.ema): made in setup(), on the training device, from the weights there.
        self.ema_cfg = dict(cfg.train.get("ema") or {})
        self.ema = None
        self._pending_ema: dict[str, Any] | None = None
        self.last_train_metrics: dict[str, float] = {}  # the losses last read back (_log_losses)

    # ---- set-up: class images, cached latents and text embeddings -------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit" or getattr(self, "instance_bank", None) is not None:
            return
        trainer = self.trainer
        device = trainer.strategy.root_device
        cfg = self.run_cfg
        # Cast on the host, then move: moved first, a frozen base would sit on the device in fp32 for a moment
        # (Flux LoRA: 67 GB of fp32 transformer + T5 before the cast, against a 40 GB planned peak).
        speed.cast_frozen(self, cfg.model.get("frozen_dtype", "auto"), str(cfg.trainer.precision), device)
        for m in (self.unet, self.vae, *self.text_encoders):
            m.to(device)
        res = int(cfg.data.resolution)
        guidance = dict(cfg.guidance)
        ctx = PriorContext(
            class_prompt=self.class_prompt, resolution=res, guidance=guidance,
            model_identity=self.components.identity, scheduler_config=self.components.scheduler_config,
            make_render=lambda: self._render_fn(guidance), rank=trainer.global_rank,
            world_size=trainer.world_size, barrier=trainer.strategy.barrier,
            progress=trainer.is_global_zero and cfg.get("progress", True),
            pipeline_kwargs=self.family.call_kwargs(),
        )
        # Class images come from the base model: made here, before any step and before a checkpoint is
        # restored (Lightning restores after setup), so a resumed run never renders them from tuned weights.
        class_paths = self.prior.class_images(ctx)
        k_cls = int(self.val_cfg.get("class_images") or 0)
        val_class_paths: list[Path] = []
        if k_cls:
            if k_cls >= len(class_paths):
                from dreambench.errors import UserError
                raise UserError(f"train.val_loss.class_images={k_cls} needs more class images than the "
                                f"{len(class_paths)} the prior has (prior.num_images), some left to train on")
            class_paths, val_class_paths = class_paths[:-k_cls], class_paths[-k_cls:]
        self.val_class_paths = val_class_paths
        masks = None
        if self.loss_cfg["mask"]:  # loss.mask: <photo>.mask.png or the alpha channel, on the latent grid
            from dreambench.data.sidecars import photo_masks
            masks = photo_masks(self.instance_paths, res, cfg.data.center_crop)
        with self._precision():
            self.instance_bank = LatentBank.from_paths(self.vae, self.instance_paths, res, cfg.data.center_crop,
                                                       cfg.data.hflip, masks=masks)
            self.class_bank = self._class_bank(class_paths, res) if class_paths else None
        if cfg.data.get("buckets"):
            self._setup_buckets(res)
        self.instance_ids = self._tokenize(self.instance_prompt).to(device)
        self.class_ids = self._tokenize(self.class_prompt).to(device)
        if not self.train_text_encoder:  # frozen text encoder: embeddings once, not every step
            with torch.no_grad():
                self.instance_emb = cond_float(self.encode(self.instance_ids))
                self.class_emb = cond_float(self.encode(self.class_ids))
        self._setup_captions(device)
        self._setup_val(res, val_class_paths)
        # Noise and timesteps come from one generator per rank whose state travels in the checkpoint.
        self.noise_generator = torch.Generator(device=device).manual_seed(int(cfg.seed) * 1009 + trainer.global_rank)
        log.info("instance prompt %r, class prompt %r, %d instance / %d class latents", self.instance_prompt,
                 self.class_prompt, len(self.instance_bank), len(self.class_bank) if self.class_bank else 0)
        if self.ema_cfg.get("enabled"):
            self.ema = self._make_ema()
        # After the class images: compiling for inference first would only add a recompile.
        speed.compile_unet(self.unet, bool(cfg.model.get("compile", False)))

    def configure_model(self) -> None:
        """trainer=fsdp (Lightning's ModelParallelStrategy): shard the trained modules across the ranks, after
        setup() made the class images and latents with whole modules (dreambench/parallel.py). Other strategies
        have no device mesh and leave the model as it is."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or getattr(self, "_sharded", False):
            return
        from dreambench import parallel
        held = parallel.shard_trained(self, mesh["data_parallel"])
        self._sharded = True
        log.info("trainer=fsdp: rank %d of %d holds %s parameters", self.trainer.global_rank, self.trainer.world_size,
                 ", ".join(f"{n} {k:,}" for n, k in held.items()))

    def _class_bank(self, class_paths: list[Path], res: int) -> LatentBank:
        """The class images' latents, cached by content in data.latents_cache_dir (null: none)."""
        cfg = self.run_cfg
        cache = cfg.data.get("latents_cache_dir")
        p = next(self.vae.parameters())
        context = {"model": self.components.identity, "vae": dict(self.vae.config), "dtype": str(p.dtype),
                   "device": p.device.type, "precision": str(cfg.trainer.precision),
                   "vae_fp32": bool(getattr(self.vae, "_dreambench_fp32", False))}
        t0 = time.perf_counter()
        bank, hit = LatentBank.cached(cache, context, self.vae, class_paths, res, cfg.data.center_crop,
                                      cfg.data.hflip)
        log.info("class latents: %s (%d images, %.1f s)", "cache hit" if hit else
                 ("encoded, cached" if cache else "encoded"), len(class_paths), time.perf_counter() - t0)
        return bank

    def _setup_buckets(self, res: int) -> None:
        """data.buckets: each photo at the aspect-ratio bucket nearest its own aspect (diffusers'
        `generate_aspect_ratio_buckets` for a res² pixel budget, `find_nearest_bucket`), covered and cropped
        instead of cropped to a square; one bank per photo ([photo, mirror] with hflip). Class images stay square."""
        from diffusers.training_utils import find_nearest_bucket, generate_aspect_ratio_buckets

        from dreambench.data.images import load_image
        cfg = self.run_cfg.data
        # Both sides must survive the VAE's and the UNet's downsampling: 8 x 8 = 64 px for SD.
        vae_f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        unet_f = 2 ** (len(self.unet.config.down_block_types) - 1)
        ladder = generate_aspect_ratio_buckets(res, divisibility=vae_f * unet_f)
        self.bucket_banks, self.photo_buckets = [], []
        for p in self.instance_paths:
            w, h = load_image(p).size
            hw = ladder[find_nearest_bucket(h, w, ladder)]
            masks = None
            if self.loss_cfg["mask"]:
                from dreambench.data.sidecars import photo_masks
                masks = photo_masks([p], res, cfg.center_crop, size_hw=hw)
            with self._precision():
                self.bucket_banks.append(LatentBank.from_paths(self.vae, [p], res, cfg.center_crop, cfg.hflip,
                                                               masks=masks, size_hw=hw))
            self.photo_buckets.append(hw)
        log.info("aspect-ratio buckets (H x W): %s", {p.name: f"{h}x{w}" for p, (h, w) in
                                                       zip(self.instance_paths, self.photo_buckets)})

    def _setup_captions(self, device: torch.device) -> None:
        """data.captions / data.caption_dropout: a prompt per photo (token ids [n_photos, L]) and the empty prompt;
        with a frozen text encoder their embeddings are computed here once, like the instance prompt's."""
        cfg = self.run_cfg.data
        self.caption_dropout = float(cfg.get("caption_dropout") or 0.0)
        self.captioned = bool(cfg.get("captions")) or self.caption_dropout > 0
        if not self.captioned:
            return
        prompts = [self.instance_prompt] * len(self.instance_paths)
        if cfg.get("captions"):
            from dreambench.data.sidecars import photo_prompts
            try:
                prompts, n = photo_prompts(self.instance_paths, self.instance_prompt, self.identifier,
                                           str(cfg.class_noun))
            except ValueError as e:
                from dreambench.errors import UserError
                raise UserError(str(e)) from None
            log.info("captions: %d of %d photos have a <photo>.txt caption, the others %r", n,
                     len(self.instance_paths), self.instance_prompt)
        self.photo_prompts = prompts
        self.caption_ids = torch.cat([self._tokenize(p) for p in prompts]).to(device)
        self.empty_ids = self._tokenize("").to(device)
        if not self.train_text_encoder:
            with torch.no_grad():
                self.caption_embs = cond_float(self.encode(self.caption_ids))
                self.empty_emb = cond_float(self.encode(self.empty_ids))
        self._drop_table = torch.zeros(0, dtype=torch.bool, device=device)

    def _dropped(self, seed: int, base: int, b: int) -> torch.Tensor:
        """[b] bool: which of draw positions base..base+b-1 get the empty prompt (data.caption_dropout). The j-th
        value of one seeded stream, so a pure function of the position (resume draws the same) that touches no
        generator of the run; a table for the whole run, made once on the device (see _indices)."""
        if base + b > len(self._drop_table):
            accum = max(1, int(self.trainer.accumulate_grad_batches))
            total = max(base + b, (int(self.trainer.max_steps) + 1) * accum * self.trainer.world_size * b)
            u = np.random.default_rng([seed, 0xCA97]).random(total)
            self._drop_table = torch.from_numpy(u < self.caption_dropout).to(self.instance_bank.mean.device)
        return self._drop_table[base:base + b]

    @property
    def real_images(self) -> list:
        """The subject's photos as RGB images (the drift monitor's references)."""
        if getattr(self, "_real_images", None) is None:
            from dreambench.data.images import load_image
            self._real_images = [load_image(p) for p in self.instance_paths]
        return self._real_images

    # ---- the model family's parts ------------------------------------------------------------------------------
    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The family's text encoders that this model has (SD3 without T5: the two CLIP ones)."""
        return [m for m in (getattr(self, n) for n in self.family.text_encoders) if m is not None]

    def named_text_encoders(self, trainable: bool = False) -> list[tuple[str, torch.nn.Module]]:
        """(attribute name, encoder): all of the family's, or those train_text_encoder / LoRA may train."""
        names = self.family.trainable_text_encoders if trainable else self.family.text_encoders
        return [(n, getattr(self, n)) for n in names]

    def parts(self) -> dict[str, Any]:
        """The pipeline components by their diffusers names."""
        return {n: getattr(self, n) for n in ("unet", "vae", *self.family.text_encoders, *self.family.tokenizers)}

    def _tokenize(self, prompt: str) -> torch.Tensor:
        """[1, L] token ids ([1, n, L] for a family with n tokenizers)."""
        return self.family.tokenize([getattr(self, n) for n in self.family.tokenizers], [prompt])

    def encode(self, ids: torch.Tensor):
        """Token ids -> the denoiser's text conditioning (a dict of tensors batched along dim 0)."""
        return self.family.encode([getattr(self, n) for n in self.family.text_encoders], ids)

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return self.family.denoise(self.unet, noisy, t, cond)

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

    def sample_cache_context(self) -> dict[str, Any]:
        """What decides the untrained model's sample images besides the prompts and seeds (the step-0 grid's cache
        key, callbacks.samples): the base model's identity, the run's model / method / guidance / prompt / seed
        settings, the precision, the device and the dtype of every part."""
        cfg = self.run_cfg
        pick = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "method", "guidance")}
        data = {k: cfg.data.get(k) for k in ("identifier", "class_noun", "instance_prompt", "class_prompt",
                                             "resolution")}
        dtypes = {name: str(next(m.parameters()).dtype) for name, m in
                  (("unet", self.unet), ("vae", self.vae), *self.named_text_encoders(False)) if m is not None}
        return {"model": self.components.identity, "cfg": pick, "data": data, "seed": int(cfg.seed),
                "identifier": self.identifier, "precision": str(cfg.trainer.precision),
                "device": self.device.type, "dtypes": dtypes, "call": self.family.call_kwargs()}

    def sampling_pipeline(self, guidance: dict[str, Any] | None = None):
        g = dict(guidance or self.run_cfg.guidance)
        return self.family.pipeline(self.parts(), make_scheduler(g["scheduler"], self.components.scheduler_config))

    # ---- training -----------------------------------------------------------------------------------------
    def _draw(self, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
        """(latents [instance; class], conditioning, number of instance samples, latent loss mask or None)."""
        cfg = self.run_cfg
        accum = max(1, int(self.trainer.accumulate_grad_batches))
        b = int(cfg.data.batch_size)
        micro = self.global_step * accum + batch_idx % accum
        base = (micro * self.trainer.world_size + self.trainer.global_rank) * b
        seed = int(cfg.seed)
        need_geometry = self.family.needs_image_geometry  # SDXL's time_ids: each drawn image's own size and crop
        if self.bucket_banks is not None:  # one photo per step (data.batch_size=1), at its bucket's shape
            i = draw_indices(len(self.instance_bank), seed, [base])[0]  # on the host: no device sync for it
            n = len(self.bucket_banks)
            bank = self.bucket_banks[i % n]
            idx = torch.tensor([i], device=bank.mean.device)
            sel = idx // n  # 0: the photo, 1: its mirror (hflip)
            inst = bank.sample(sel, self.noise_generator)
            mask = bank.mask[sel] if bank.mask is not None else None
            geometry = [bank.geometry[sel]] if need_geometry else []
        else:
            idx = self._indices(len(self.instance_bank), seed, base, b)
            inst = self.instance_bank.sample(idx, self.noise_generator)
            mask = self.instance_bank.mask[idx] if self.instance_bank.mask is not None else None
            geometry = [self.instance_bank.geometry[idx]] if need_geometry else []
        ids = [self.instance_ids] * b
        embs = [self.instance_emb] * b if not self.train_text_encoder else None
        if self.captioned:  # each photo's caption (bank index i and its mirror i + n are photo i % n), or ""
            drop = self._dropped(seed, base, b)
            photo = idx % len(self.caption_ids)
            if embs is not None:
                embs = [cond_where(drop, self.empty_emb, cond_take(self.caption_embs, photo))]
            else:
                ids = [torch.where(drop.view(-1, *[1] * (self.caption_ids.ndim - 1)), self.empty_ids,
                                   self.caption_ids[photo])]
        latents = inst
        if self.class_bank is not None:
            cls_idx = self._indices(len(self.class_bank), seed + 1, base, b)
            cls = self.class_bank.sample(cls_idx, self.noise_generator)
            if need_geometry:
                geometry.append(self.class_bank.geometry[cls_idx])
            if self.bucket_banks is not None:  # shapes may differ: two forward passes (see _bucket_step)
                latents = (inst, cls)
            else:
                latents = torch.cat([inst, cls])  # one batch [instance; class], one forward pass (§3.3)
                if mask is not None:  # class images are weighed whole
                    mask = torch.cat([mask, torch.ones_like(mask)])
            ids += [self.class_ids] * b
            if embs is not None:
                embs += [self.class_emb] * b
        # One conditioning for the whole [instance; class] batch, every part of it batched along dim 0.
        cond = cond_cat(embs) if embs is not None else self.encode(torch.cat(ids))
        if need_geometry:
            cond = self.family.add_image_conditioning(cond, torch.cat(geometry))
        return latents, cond, b, mask

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
        latents, cond, n_inst, mask = self._draw(batch_idx)
        if self.family.objective == "flow_matching":
            return self._flow_step(latents, cond, n_inst, mask, batch_idx)
        if self.bucket_banks is not None:
            return self._bucket_step(latents if isinstance(latents, tuple) else (latents,), cond, mask, batch_idx)
        g = self.noise_generator
        noise = torch.randn(latents.shape, generator=g, device=latents.device, dtype=latents.dtype)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g,
                          device=latents.device)
        # The loss switches (conf `loss`, docs/TOOLBOX.md) draw from the same generator, after noise and t, and only
        # when on: a run with all of them off draws exactly what it drew before they existed.
        lc = self.loss_cfg
        if lc["noise_offset"]:
            noise = noise + losses.offset_noise(latents.shape, lc["noise_offset"], g, latents.device, latents.dtype)
        model_noise = noise
        if lc["input_perturbation"]:  # Ning et al. 2023: the UNet sees noise + γ·ξ, the target keeps `noise`
            model_noise = noise + lc["input_perturbation"] * torch.randn(latents.shape, generator=g,
                                                                        device=latents.device, dtype=latents.dtype)
        noisy = self.noise_scheduler.add_noise(latents, model_noise, t)
        pred = self.denoise(noisy, t, cond)
        target = losses.diffusion_target(self.prediction_type, latents, noise, t, self.alphas_cumprod)
        weights = None
        if lc["min_snr_gamma"]:  # null or 0: off (0 would weigh every step 0; a sweep's choice() cannot say null)
            weights = losses.min_snr_weights(losses.snr(self.alphas_cumprod, t), lc["min_snr_gamma"],
                                             self.prediction_type)
        loss, loss_inst, loss_prior = losses.weighted_loss(pred, target, n_inst, self.prior.weight, weights, mask)
        return self._logged(loss, loss_inst, loss_prior, batch_idx)

    def _flow_step(self, latents: torch.Tensor, cond, n_inst: int, mask: torch.Tensor | None,
                   batch_idx: int) -> torch.Tensor:
        """Rectified-flow step (SD3; model.flow): noise, then a timestep index per sample drawn by
        `timestep_sampling` (diffusers' compute_density_for_timestep_sampling) from the same generator; σ from the
        scheduler's shifted schedule; x_t = (1 - σ) x0 + σ ε; target ε - x0; each sample weighted by
        `loss_weighting` (compute_loss_weighting_for_sd3); the [instance; class] halves split on the batch axis."""
        g, fc = self.noise_generator, self.flow_cfg
        noise = torch.randn(latents.shape, generator=g, device=latents.device, dtype=latents.dtype)
        idx = losses.flow_timestep_indices(latents.shape[0], len(self.flow_sigmas), fc["timestep_sampling"],
                                           float(fc["logit_mean"]), float(fc["logit_std"]), float(fc["mode_scale"]),
                                           g, latents.device)
        sigmas = self.family.shift_sigmas(self.flow_sigmas[idx], latents.shape, self.components.scheduler_config)
        noisy, target = losses.flow_matching_pair(latents, noise, sigmas)
        t = sigmas * len(self.flow_sigmas)  # the scheduler's timestep values (σ x num_train_timesteps)
        pred = self.denoise(noisy, t, cond)
        weights = losses.flow_loss_weights(fc["loss_weighting"], sigmas)
        loss, loss_inst, loss_prior = losses.weighted_loss(pred, target, n_inst, self.prior.weight, weights, mask)
        return self._logged(loss, loss_inst, loss_prior, batch_idx)

    def _logged(self, loss: torch.Tensor, loss_inst: torch.Tensor, loss_prior: torch.Tensor,
                batch_idx: int) -> torch.Tensor:
        named = {"train/loss": loss, "train/loss_instance": loss_inst}
        if self.class_bank is not None:
            named["train/loss_prior"] = loss_prior
        self._log_losses(named, batch_idx)
        return loss

    # ---- validation loss (train.val_loss) -------------------------------------------------------------------------
    def _setup_val(self, res: int, val_class_paths: list[Path]) -> None:
        """Fixed (image, timestep, noise) triples, made once: each validation image's latent mean (no sampling,
        no flip) at `timesteps` timesteps evenly spread over the schedule, with noise from a generator of its own.
        Nothing here or in validation_loss touches the training generators."""
        self.val_set = None
        every = int(self.val_cfg.get("every_n_steps") or 0)
        paths = self.val_paths if self.val_paths else self.instance_paths  # holdout 0: the training photos
        if every <= 0:
            return
        cfg = self.run_cfg
        with self._precision():
            inst_bank = LatentBank.from_paths(self.vae, paths, res, cfg.data.center_crop)
            cls_bank = (LatentBank.from_paths(self.vae, val_class_paths, res, cfg.data.center_crop)
                        if val_class_paths else None)
        inst = inst_bank.mean
        cls = cls_bank.mean if cls_bank is not None else inst[:0]
        geometry = torch.cat([inst_bank.geometry, *([cls_bank.geometry] if cls_bank is not None else [])])
        n_t = int(self.val_cfg.get("timesteps", 5))
        T = int(self.noise_scheduler.config.num_train_timesteps)
        ts = torch.tensor([int((k + 0.5) * T / n_t) for k in range(n_t)])  # e.g. 100, 300, ..., 900 for 5 of 1000
        x0 = torch.cat([inst, cls]).repeat_interleave(n_t, dim=0)  # [(images) * n_t, C, h, w]
        t = ts.repeat(len(inst) + len(cls)).to(x0.device)
        g = torch.Generator().manual_seed(int(self.val_cfg.get("seed", 0)))
        noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
        is_class = torch.zeros(len(x0), dtype=torch.bool, device=x0.device)
        is_class[len(inst) * n_t:] = True
        prompts = [self.instance_prompt] * len(inst)
        if cfg.data.get("captions"):  # each validation photo with its own caption (never dropped)
            from dreambench.data.sidecars import photo_prompts
            prompts = photo_prompts(paths, self.instance_prompt, self.identifier, str(cfg.data.class_noun))[0]
        ids = torch.cat([self._tokenize(p) for p in prompts + [self.class_prompt] * len(cls)])
        self.val_set = {"noisy": self.noise_scheduler.add_noise(x0, noise, t), "t": t, "is_class": is_class,
                        "ids": ids.repeat_interleave(n_t, dim=0).to(x0.device),
                        "geometry": geometry.repeat_interleave(n_t, dim=0).to(x0.device),
                        "target": losses.diffusion_target(self.prediction_type, x0, noise, t, self.alphas_cumprod)}
        log.info("validation loss every %d steps on %d photo(s)%s and %d class image(s), %d timesteps each", every,
                 len(inst), "" if self.val_paths else " (the training photos: none held out)", len(cls), n_t)

    @torch.no_grad()
    def validation_loss(self) -> dict[str, torch.Tensor]:
        """Plain MSE to the target (no min-SNR or mask weighting, so runs with other loss switches compare) over the
        fixed triples: val/loss, and its photo and class-image parts. The UNet runs in eval mode (no dropout draws);
        the global RNGs are forked as the drift monitor does."""
        v = self.val_set
        nets = [m for m in (self.unet, *self.text_encoders) if m.training]
        for m in nets:
            m.eval()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), self._precision():
                errs = []
                for i in range(0, len(v["t"]), 8):
                    sl = slice(i, i + 8)
                    cond = self.encode(v["ids"][sl])  # each image's prompt, by the current text encoder
                    if self.family.needs_image_geometry:
                        cond = self.family.add_image_conditioning(cond, v["geometry"][sl])
                    pred = self.denoise(v["noisy"][sl], v["t"][sl], cond)
                    errs.append(((pred.float() - v["target"][sl].float()) ** 2).mean(dim=(1, 2, 3)))
        finally:
            for m in nets:
                m.train()
        err = torch.cat(errs)
        out = {"val/loss": err.mean(), "val/loss_instance": err[~v["is_class"]].mean()}
        if bool(v["is_class"].any()):
            out["val/loss_class"] = err[v["is_class"]].mean()
        return out

    # ---- EMA of the trained weights (train.ema) ------------------------------------------------------------------
    def ema_parameters(self) -> list[torch.nn.Parameter]:
        """What EMA averages: exactly the trained parameters (UNet, text encoder if trained, LoRA adapters, the
        textual-inversion embedding), in module order."""
        return [p for p in self.parameters() if p.requires_grad]

    def _make_ema(self):
        # diffusers' EMAModel (training_utils), as its train_text_to_image.py `--use_ema` uses it: decay warm-up
        # (1 + n) / (10 + n) capped at `decay`, or crowsonkb's 1 - (1 + n / inv_gamma)^-power with `warmup`;
        # n counts EMA updates after `update_after_step` of them.
        from diffusers.training_utils import EMAModel
        c = self.ema_cfg
        ema = EMAModel(self.ema_parameters(), decay=float(c.get("decay", 0.9999)),
                       min_decay=float(c.get("min_decay", 0.0)), update_after_step=int(c.get("update_after_step", 0)),
                       use_ema_warmup=bool(c.get("warmup", False)), inv_gamma=float(c.get("inv_gamma", 1.0)),
                       power=float(c.get("power", 2 / 3)), foreach=False)
        if self._ema_offloaded():
            ema.to("cpu")
        return ema

    def _ema_offloaded(self) -> bool:
        return str(self.ema_cfg.get("device", "same")) == "cpu"

    clip_feeds_guard = True  # configure_gradient_clipping hands the clip's total norm to the NumericsGuard

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clipping by norm as Lightning's does it (torch's clip_grad_norm_ over the optimizer's gradients), keeping
        the total norm it computes for the NumericsGuard's non-finite check: one pass over the gradients a step,
        not two."""
        from dreambench.resilience import NumericsGuard
        guard = next((c for c in self.trainer.callbacks if isinstance(c, NumericsGuard)), None)
        if guard is None or not guard.checks_after_clip(self.trainer, self):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms = [torch.nn.utils.clip_grad_norm_(grads, float(gradient_clip_val))] if grads else []
        # trainer=fsdp: sharded gradients give the norm as a DTensor; the guard reads a plain tensor.
        norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
        guard.after_clip(self.trainer, self, optimizer, norms)  # the loss is checked even with no gradient
        return None

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # The method's fix-up (textual inversion copies back the embedding rows that must not move) and the EMA
        # update happen here, not in on_train_batch_end: callbacks' on_train_batch_end (ModelCheckpoint,
        # preemption) run before the module's, so a checkpoint of step N would hold rows moved by weight decay or
        # miss step N's EMA update, and resume would not be exact.
        self.method.after_optimizer_step(self)
        # global_step counts this step only after optimizer_step returns, hence + 1.
        if self.ema is not None and (self.global_step + 1) % int(self.ema_cfg.get("every_n_steps", 1)) == 0:
            params = self.ema_parameters()
            if self._ema_offloaded():  # as diffusers' --offload_ema: to the device for the update, then back
                self.ema.to(params[0].device)
                self.ema.step(params)
                self.ema.to("cpu")
            else:
                self.ema.step(params)

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights in place of the trained ones inside the block (samples, drift metrics, export), the
        trained ones back bit for bit after it. A no-op with EMA off."""
        if self.ema is None:
            yield
            return
        params = self.ema_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def _bucket_step(self, parts: tuple[torch.Tensor, ...], cond: torch.Tensor, mask: torch.Tensor | None,
                     batch_idx: int) -> torch.Tensor:
        """data.buckets: the instance latent [1, C, h, w] (its bucket) and the class latent [1, C, H, H] (square)
        cannot share a batch, so each gets its own forward pass; the loss is the same formula (instance mean + λ
        prior mean) and the loss switches apply to each part as in training_step. Draw order: noise per part,
        then t for both, then offsets and perturbations per part."""
        g, lc = self.noise_generator, self.loss_cfg
        noises = [torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype) for x in parts]
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(parts),), generator=g,
                          device=parts[0].device)
        if lc["noise_offset"]:
            noises = [n + losses.offset_noise(n.shape, lc["noise_offset"], g, n.device, n.dtype) for n in noises]
        model_noises = noises
        if lc["input_perturbation"]:
            model_noises = [n + lc["input_perturbation"] * torch.randn(n.shape, generator=g, device=n.device,
                                                                       dtype=n.dtype) for n in noises]
        out = []
        for k, (x, noise, mn) in enumerate(zip(parts, noises, model_noises)):
            tk = t[k:k + 1]
            pred = self.denoise(self.noise_scheduler.add_noise(x, mn, tk), tk, cond_take(cond, slice(k, k + 1)))
            target = losses.diffusion_target(self.prediction_type, x, noise, tk, self.alphas_cumprod)
            w = (losses.min_snr_weights(losses.snr(self.alphas_cumprod, tk), lc["min_snr_gamma"],
                                        self.prediction_type) if lc["min_snr_gamma"] else None)
            out.append(losses.weighted_loss(pred, target, 1, 0.0, w, mask if k == 0 else None)[0])
        loss_inst = out[0]
        loss_prior = out[1] if len(out) > 1 else loss_inst.new_zeros(())
        loss = loss_inst + float(self.prior.weight) * loss_prior
        return self._logged(loss, loss_inst, loss_prior, batch_idx)

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
        # only paces the loop. One epoch is the whole run, on every rank: under DDP and FSDP Lightning's
        # DistributedSampler gives each rank 1/world of the items, so there are world x n of them. (With n, a
        # two-rank run had an epoch boundary half-way, whose new loader iterator draws its base seed from the
        # global torch RNG: a run resumed after it drew from another state than the uninterrupted one.)
        n = int(self.trainer.max_steps) * max(1, int(self.trainer.accumulate_grad_batches))
        return torch.utils.data.DataLoader(torch.arange(n * max(1, int(self.trainer.world_size))), batch_size=None,
                                           shuffle=False)

    # ---- checkpoints hold what was trained ------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._first_step()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = int(self.val_cfg.get("every_n_steps") or 0)
        step = self.global_step
        if step >= int(self.trainer.max_steps) and self.trainer.is_global_zero:
            self._last_step()  # the module's hook runs after the callbacks' (checkpoint, grids) of this step
        if self.val_set is not None and step % every == 0 and step != self._val_last_step:
            self._val_last_step = step  # once per optimizer step, also with gradient accumulation
            values = {k: float(v) for k, v in self.validation_loss().items()}
            # As the drift monitor does: self.log feeds callback_metrics (metrics.json, pruning), the loggers are
            # written directly at this step (Lightning would repeat the value on every later row until the next).
            for k, v in values.items():
                self.log(k, v, on_step=True, on_epoch=False, logger=False, batch_size=1, rank_zero_only=True)
            if self.trainer.is_global_zero:
                for lg in self.trainer.loggers:
                    lg.log_metrics(values, step=step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.method.trained_prefixes(self)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(keep)}
        # Exact resume: python/numpy/torch global RNGs and the noise generator, of every rank.
        checkpoint["dreambench_rng"] = resilience.gather_rng(self.trainer, self.noise_generator)
        if self.ema is not None:
            ema = self.ema.state_dict()
            ema["shadow_params"] = [p.detach().clone() for p in ema["shadow_params"]]
            checkpoint["dreambench_ema"] = ema

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs after setup() (Lightning restores after it), so the noise generator exists and the class images
        # and latents were made from the base model before the tuned weights came back.
        # The states are applied in on_train_start, after the callbacks' on_train_start (a step-0 sample grid of
        # the resumed run draws from the global torch RNG; the uninterrupted run made no grid at this step).
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self._pending_rng = resilience.rank_state(checkpoint.get("dreambench_rng"), rank)
        if self.ema is not None:
            if "dreambench_ema" in checkpoint:
                state = checkpoint["dreambench_ema"]
                # load_state_dict keeps the checkpoint's tensors: put them where this run keeps its EMA.
                dev = torch.device("cpu") if self._ema_offloaded() else self.ema.shadow_params[0].device
                state = {**state, "shadow_params": [p.to(dev) for p in state["shadow_params"]]}
                self.ema.load_state_dict(state)
            else:  # a checkpoint of a run without EMA: start the average from the restored weights
                log.warning("train.ema.enabled=true but the checkpoint holds no EMA: the average starts from its "
                            "weights at step %s", checkpoint.get("global_step"))
                self._pending_ema = {"from_weights": True}

    def on_train_start(self) -> None:
        if self._pending_ema is not None:  # the trained weights are restored by now (not yet in on_load_checkpoint)
            self.ema = self._make_ema()
            self._pending_ema = None
        if self._pending_rng is not None:
            resilience.restore_rng(self._pending_rng, self.noise_generator)
            self._pending_rng = None

    # ---- export --------------------------------------------------------------------------------------------
    def base_pipeline(self):
        """The in-memory components as a pipeline with the base model's own scheduler class."""
        import diffusers
        sched_cls = getattr(diffusers, self.components.scheduler_config.get("_class_name", "DDPMScheduler"))
        return self.family.pipeline(self.parts(), sched_cls.from_config(self.components.scheduler_config))

    def export(self, folder: Path) -> None:
        """The method's artefact: a diffusers pipeline folder (dreambooth), adapter weights (lora), an
        embedding file (textual inversion)."""
        speed.restore_frozen(self)  # the base model's own fp32 VAE / text encoder, not a bf16 round trip
        with self.ema_weights():  # train.ema: the averaged weights are the run's model
            self.method.export(self, folder)
