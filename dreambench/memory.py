"""Memory planner: the peak memory of one training step, estimated before any weight is loaded.

Parameter counts come from the model's own configs (`unet/`, `text_encoder/`, `vae/` config.json), built on the
meta device (no storage); what is trainable comes from running the method's own `prepare` / `param_groups` on
those meta modules; activation memory is traced, not guessed: one forward pass on meta tensors at the run's
resolution and batch, with `saved_tensors_hooks` summing every tensor autograd keeps for the backward pass.

    peak ≈ weights + gradients + optimizer state + autocast weight copies + saved activations + overhead

It is an upper estimate of the training step (everything above alive at once, as at the start of backward),
not of set-up (class-image generation and latent caching run before the optimizer state exists).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dreambench.errors import UserError

log = logging.getLogger("dreambench")

def human(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


GB = 1e9  # decimal GB, as GPU memory is sold and as the issue counts (3.4 GB of fp32 SD 1.5 UNet weights)

# Optimizer state in bytes per trainable parameter, by optimizer class name: AdamW keeps exp_avg and
# exp_avg_sq in the parameter's dtype (fp32 master weights: 2 x 4 B); bitsandbytes' 8-bit Adam keeps both in
# uint8 (2 x 1 B, plus block-wise scales, < 1 %); SGD with momentum one fp32 buffer.
OPTIMIZER_STATE_BYTES = {"AdamW": 8, "Adam": 8, "AdamW8bit": 2, "Adam8bit": 2, "PagedAdamW8bit": 2, "SGD": 4,
                         "Adafactor": 4}
# CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's fragmentation: measured ~0.6-1 GB on
# Ampere/Hopper for a single-process PyTorch job; 1 GB keeps the estimate on the safe side.
CUDA_OVERHEAD_BYTES = int(1.0 * GB)


@dataclass
class MemoryEstimate:
    params: dict[str, int]                 # total parameters per component
    trainable: int                         # parameters the optimizer updates
    parts: dict[str, int]                  # bytes: weights, gradients, optimizer, autocast_copies, activations, overhead
    device: str = "cpu"
    capacity: int | None = None            # device memory in bytes (None: not checked, e.g. CPU)
    notes: list[str] = field(default_factory=list)
    exact: bool = True                     # False: the method could not be planned (an upper bound, never a stop)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity

    def line(self) -> str:
        unit, div = ("GB", GB) if self.total >= 0.1 * GB else ("MB", 1e6)
        p = ", ".join(f"{k} {v / div:.2f}" for k, v in self.parts.items())
        cap = (f" of {human(self.capacity)} on {self.device}" if self.capacity
               else f" ({self.device}: capacity not checked)")
        return (f"memory plan: ~{self.total / div:.2f} {unit} peak{cap} [{p} {unit}]; "
                f"{self.trainable / 1e6:.2f} M of {sum(self.params.values()) / 1e6:.2f} M parameters trained")

    def summary(self) -> dict[str, Any]:
        return {"estimated_peak_gb": round(self.total / GB, 3),
                "parts_gb": {k: round(v / GB, 3) for k, v in self.parts.items()},
                "params_m": {k: round(v / 1e6, 3) for k, v in self.params.items()},
                "trainable_m": round(self.trainable / 1e6, 4), "device": self.device,
                "capacity_gb": round(self.capacity / GB, 2) if self.capacity else None, "notes": self.notes}


# ---- configs and meta-device modules -------------------------------------------------------------------------
def read_configs(model_ref: str, revision: str | None = None) -> dict[str, dict[str, Any]]:
    """The three config.json files of a diffusers folder or hub repo (a few KB each; hub files come from the
    local hub cache when there is no network)."""
    out = {}
    optional = ("unet", "transformer", "text_encoder_2", "text_encoder_3")  # which exist depends on the family
    for sub in ("unet", "transformer", "text_encoder", "vae", "text_encoder_2", "text_encoder_3"):
        p = Path(model_ref).expanduser() / sub / "config.json"
        if not p.is_file():
            from huggingface_hub import hf_hub_download
            try:
                p = Path(hf_hub_download(model_ref, f"{sub}/config.json", revision=revision))
            except Exception:  # a component this family does not have (a hub lookup that fails)
                if sub in optional:
                    continue
                raise
        out[sub] = json.loads(p.read_text())
    if "unet" not in out and "transformer" not in out:
        raise FileNotFoundError(f"{model_ref}: neither unet/ nor transformer/ config.json")
    return out


def config_family(configs: dict[str, dict[str, Any]]) -> str:
    """The model family a set of component configs describes."""
    if "transformer" in configs:
        return "flux" if str(configs["transformer"].get("_class_name", "")).startswith("Flux") or \
            "num_single_layers" in configs["transformer"] else "sd3"
    return "sdxl" if "text_encoder_2" in configs else "sd"


def meta_modules(configs: dict[str, dict[str, Any]], device: str | torch.device = "meta"):
    """(unet, {text encoder name: encoder}, vae) on the meta device; SDXL's second encoder when its config is
    there (a CLIPTextModelWithProjection, as in SDXL). Another `device` builds them there with random weights
    (bench: random full-size models built on the GPU)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def clean(c):  # config.json files carry bookkeeping keys (_class_name, _diffusers_version) the constructors refuse
        return {k: v for k, v in c.items() if not k.startswith("_")}

    def text_kw(c):
        return {k: v for k, v in clean(c).items() if k not in (
            "architectures", "torch_dtype", "dtype", "transformers_version", "model_type")}
    family = config_family(configs)
    with torch.device(device):
        vae = AutoencoderKL.from_config(clean(configs["vae"]))
        if family in ("sd", "sdxl"):
            unet = UNet2DConditionModel.from_config(clean(configs["unet"]))
        else:
            import diffusers
            cls = diffusers.FluxTransformer2DModel if family == "flux" else diffusers.SD3Transformer2DModel
            unet = cls.from_config(clean(configs["transformer"]))
        # SD 1.x / Flux: CLIPTextModel first; SDXL: a projection on the second; SD 3.5: on both.
        first = CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel
        text_encoders = {"text_encoder": first(CLIPTextConfig(**text_kw(configs["text_encoder"])))}
        for name in ("text_encoder_2", "text_encoder_3"):
            if name not in configs:
                continue
            kw = text_kw(configs[name])
            if "d_model" in kw:  # T5 (Flux's text_encoder_2, SD 3.5's text_encoder_3)
                from transformers import T5Config, T5EncoderModel
                text_encoders[name] = T5EncoderModel(T5Config(**kw))
            else:
                text_encoders[name] = CLIPTextModelWithProjection(CLIPTextConfig(**kw))
    return unet, text_encoders, vae


class _Stub(torch.nn.Module):
    """What a method's prepare/param_groups see of the LightningModule: the trainable components."""

    def __init__(self, unet, text_encoders: dict[str, torch.nn.Module], vae, family: str = "sd", **context):
        super().__init__()
        self.unet, self.vae = unet, vae
        for name, te in text_encoders.items():
            setattr(self, name, te)
        from dreambench.models.families import get_family
        self.family = get_family(family)
        self.train_text_encoder = False
        for k, v in context.items():  # e.g. tokenizer, identifier, run_cfg (textual inversion adds a token)
            setattr(self, k, v)

    def named_text_encoders(self, trainable: bool = False) -> list[tuple[str, torch.nn.Module]]:
        names = self.family.trainable_text_encoders if trainable else self.family.text_encoders
        return [(n, getattr(self, n)) for n in names]


def trainable_parameters(method: Any, unet, text_encoders: dict[str, torch.nn.Module], vae,
                         context: dict[str, Any] | None = None, family: str = "sd") -> tuple[int, bool, list[str]]:
    """(trainable parameter count, text encoder in the graph with grad?, notes), from the method's own code."""
    unet.requires_grad_(False)
    for te in text_encoders.values():
        te.requires_grad_(False)
    vae.requires_grad_(False)
    # The method may change what it is given (textual inversion adds its token to the tokenizers): a copy each
    # time, so that one context serves every estimate of a switch ladder.
    ctx = {k: copy.deepcopy(v) if k.startswith("tokenizer") else v for k, v in (context or {}).items()}
    stub = _Stub(unet, text_encoders, vae, family=family, **ctx)
    te_params = [p for te in text_encoders.values() for p in te.parameters()]
    try:
        method.prepare(stub)
        groups = method.param_groups(stub, 1e-4)
        n = sum(p.numel() for g in groups for p in g["params"])
        return n, any(p.requires_grad for p in te_params), []
    except Exception as e:  # noqa: BLE001 - a method that needs more than the components (e.g. a tokenizer)
        full_te = bool(getattr(method, "train_text_encoder", False))
        unet.requires_grad_(True)
        for te in text_encoders.values():
            te.requires_grad_(full_te)
        n = sum(p.numel() for p in unet.parameters()) + (sum(p.numel() for p in te_params) if full_te else 0)
        note = (f"method {getattr(method, 'name', method)!r} could not be planned exactly "
                f"({e.__class__.__name__}); assumed the whole UNet is trained (an upper bound)")
        return n, full_te, [note]


# ---- activations: one traced forward pass on meta tensors ------------------------------------------------------
class _FlashLikeSDPA(torch.autograd.Function):
    # On meta tensors PyTorch picks the math SDPA, which keeps the L x L attention matrix for backward; the
    # fused kernels used on a GPU (flash / memory-efficient) and on a CPU (flash for CPU) keep only q, k, v,
    # the output and the log-sum-exp [B, H, L] in fp32. Traced with this stand-in to count what they keep.
    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):  # never run: the trace stops after the forward pass
        raise NotImplementedError


def _sdpa_stand_in(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    # Named as torch's own arguments: diffusers' attention dispatch (Flux) passes them by keyword.
    return _FlashLikeSDPA.apply(query, key, value)


@contextlib.contextmanager
def _fused_sdpa():
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa_stand_in
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_activation_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while `fn()` runs (parameters in `exclude` not counted)."""
    skip = {p.untyped_storage()._cdata for p in exclude}
    seen: dict[int, tuple[Any, int]] = {}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in skip:
            seen[s._cdata] = (s, s.nbytes())  # the storage is kept alive so its address is not reused
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(n for _, n in seen.values())


def _prepare_trace(model, dtype: torch.dtype, gradient_checkpointing: bool) -> None:
    from diffusers.utils import logging as dlog
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # `.to(dtype)` warns about fp32-kept modules of pretrained loading: none here
    try:
        model.to(dtype=dtype)
    finally:
        dlog.set_verbosity(level)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()


def unet_activation_bytes(unet, text_cfg: dict[str, Any], batch: int, latent_hw: int, dtype: torch.dtype,
                          gradient_checkpointing: bool, attention: str, cond_requires_grad: bool) -> int:
    _prepare_trace(unet, dtype, gradient_checkpointing)
    c = unet.config
    ctx_len = int(text_cfg.get("max_position_embeddings", 77))
    x = torch.empty(batch, c.in_channels, latent_hw, latent_hw, device="meta", dtype=dtype)
    cond = torch.empty(batch, ctx_len, c.cross_attention_dim, device="meta", dtype=dtype,
                       requires_grad=cond_requires_grad)
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    added = None
    if c.get("addition_embed_type") == "text_time":  # SDXL: pooled text embeddings + 6 size / crop time ids
        pooled = int(c.projection_class_embeddings_input_dim) - 6 * int(c.addition_time_embed_dim)
        added = {"text_embeds": torch.empty(batch, pooled, device="meta", dtype=dtype),
                 "time_ids": torch.empty(batch, 6, device="meta", dtype=dtype)}
    sdpa = _fused_sdpa() if attention == "sdpa" else contextlib.nullcontext()
    if attention == "eager":
        from diffusers.models.attention_processor import AttnProcessor
        unet.set_attn_processor(AttnProcessor())
    with sdpa, torch.enable_grad():
        return saved_activation_bytes(lambda: unet(x, t, cond, added_cond_kwargs=added), list(unet.parameters()))


def transformer_activation_bytes(family: str, model, batch: int, latent_hw: int, dtype: torch.dtype,
                                 gradient_checkpointing: bool, attention: str, cond_requires_grad: bool,
                                 max_sequence_length: int) -> int:
    """unet_activation_bytes for the transformer families, with the inputs their training step gives them: SD 3.5's
    MMDiT on [B, C, h, w] latents and 77 CLIP + `max_sequence_length` T5 tokens; Flux on (h/2)(w/2) packed tokens,
    `max_sequence_length` T5 tokens, rotary ids and the guidance value."""
    _prepare_trace(model, dtype, gradient_checkpointing)
    c = model.config

    def empty(*shape, grad=False):
        return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)
    t = torch.zeros(batch, device="meta", dtype=dtype)
    pooled = empty(batch, c.pooled_projection_dim)
    if family == "sd3":
        x = empty(batch, c.in_channels, latent_hw, latent_hw)
        ctx = empty(batch, 77 + max_sequence_length, c.joint_attention_dim, grad=cond_requires_grad)

        def fn():
            return model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled)
    else:
        n = (latent_hw // 2) ** 2
        x = empty(batch, n, c.in_channels)
        ctx = empty(batch, max_sequence_length, c.joint_attention_dim, grad=cond_requires_grad)
        img_ids, txt_ids = empty(n, 3), empty(max_sequence_length, 3)
        guidance = empty(batch) if c.guidance_embeds else None

        def fn():
            return model(hidden_states=x, timestep=t, guidance=guidance, pooled_projections=pooled,
                         encoder_hidden_states=ctx, txt_ids=txt_ids, img_ids=img_ids)
    sdpa = _fused_sdpa() if attention == "sdpa" else contextlib.nullcontext()
    with sdpa, torch.enable_grad():
        return saved_activation_bytes(fn, list(model.parameters()))


# ---- the estimate ----------------------------------------------------------------------------------------------
def _nbytes(n: int, dtype: torch.dtype) -> int:
    return n * torch.empty((), dtype=dtype).element_size()


def estimate(configs: dict[str, dict[str, Any]], method: Any, *, resolution: int, batch_size: int = 1,
             prior: bool = True, precision: str = "32-true", gradient_checkpointing: bool = False,
             optimizer: str = "AdamW", attention: str = "sdpa", frozen_dtype: torch.dtype | None = None,
             device: str = "cpu", capacity: int | None = None, context: dict[str, Any] | None = None,
             ema: bool = False, t5: bool = True, max_sequence_length: int = 256, shards: int = 1) -> MemoryEstimate:
    """Peak bytes of one step. `batch_size` instance images per step, as many class images if `prior`;
    `precision` a Lightning precision string; `frozen_dtype` the dtype of frozen components (None: as trained);
    `ema`: an EMA copy of the trained weights on the device (train.ema with device=same); `t5`: SD 3.5's T5 loaded
    (model.t5); `max_sequence_length`: T5 tokens (SD 3.5, Flux); `shards`: ranks the trained weights, their
    gradients and optimizer state are split over (trainer=fsdp), the figures being one rank's."""
    family = config_family(configs)
    if not t5 and family == "sd3":
        configs = {k: v for k, v in configs.items() if k != "text_encoder_3"}
    unet, text_encoders, vae = meta_modules(configs)
    denoiser = "unet" if family in ("sd", "sdxl") else "transformer"
    params = {denoiser: sum(p.numel() for p in unet.parameters()),
              **{n: sum(p.numel() for p in te.parameters()) for n, te in text_encoders.items()},
              "vae": sum(p.numel() for p in vae.parameters())}
    trainable, te_grad, notes = trainable_parameters(method, unet, text_encoders, vae, context, family)
    mixed = "mixed" in str(precision)
    half = torch.bfloat16 if "bf16" in str(precision) else torch.float16
    true_half = str(precision) in ("bf16-true", "16-true", "bf16", "16")
    master = half if true_half else torch.float32
    frozen = frozen_dtype or master
    # Trained weights in the master dtype; the VAE, frozen text encoders and (under mixed precision) an adapter
    # method's frozen base in `frozen` dtype; a denoiser that is wholly frozen (textual inversion) stays as loaded.
    weights = 0
    den = list(unet.parameters())
    # An adapter method's frozen base is cast to the frozen dtype under mixed precision (speed.cast_adapter_base).
    adapter_base = mixed and any(p.requires_grad for p in den) and not all(p.requires_grad for p in den)
    for name, comp in ((denoiser, unet), *text_encoders.items(), ("vae", vae)):
        for p in comp.parameters():
            dt = master if (p.requires_grad or (name == denoiser and not adapter_base)) else frozen
            weights += _nbytes(p.numel(), dt)
    grads = _nbytes(trainable, master)
    state = OPTIMIZER_STATE_BYTES.get(optimizer)
    if state is None:
        notes.append(f"optimizer {optimizer!r}: state size unknown, assumed AdamW's 8 B/parameter")
        state = 8
    opt = trainable * state
    shards = max(1, int(shards))
    if shards > 1:  # FSDP: each rank keeps 1/shards of these (a block's weights are gathered whole only in use)
        weights -= grads - grads // shards  # the trained weights are in the master dtype, as the gradients
        grads, opt = grads // shards, opt // shards
    # Autocast caches its half-precision copy of every trainable leaf weight for the whole forward pass; the
    # frozen fp32 weights are cast per use (transient, not counted).
    autocast = _nbytes(trainable, half) if mixed else 0
    # Activations: the trace runs in the compute dtype. Under autocast, matmul/conv outputs are half but norms
    # (GroupNorm, LayerNorm) run and are saved in fp32, and SiLU after a GroupNorm saves fp32 too; counting
    # the two endpoints, mixed precision sits about half-way between a pure-half and a pure-fp32 trace.
    hw = int(resolution) // (2 ** (len(configs["vae"]["block_out_channels"]) - 1))
    b = int(batch_size) * (2 if prior else 1)

    def act(dt):
        if denoiser == "transformer":
            return transformer_activation_bytes(family, unet, b, hw, dt, gradient_checkpointing, attention, te_grad,
                                                int(max_sequence_length))
        return unet_activation_bytes(unet, configs["text_encoder"], b, hw, dt, gradient_checkpointing, attention,
                                     te_grad)
    activations = (act(torch.float32) + act(half)) // 2 if mixed else act(master)
    parts = {"weights": weights, "gradients": grads, "optimizer": opt, "autocast_copies": autocast,
             "activations": activations, "overhead": CUDA_OVERHEAD_BYTES if device.startswith("cuda") else 0}
    if ema:  # EMAModel's shadow copy, in the trained weights' dtype
        parts["ema"] = _nbytes(trainable, master)
    if te_grad:
        notes.append("text-encoder activations not traced (small beside the UNet's: 77 tokens)")
    return MemoryEstimate(params, trainable, parts, device, capacity, notes, exact=not notes or not any(
        "could not be planned" in n for n in notes))


# ---- which switches make a run fit -------------------------------------------------------------------------------
CARDS_GB = (24, 48, 80)  # the cards people train on: RTX 3090/4090, A6000/L40S, A100/H100 80 GB
# The switches that lower the peak, in the order a user would try them (least change to what is trained first):
# (label, the overrides that set them, estimate() keyword changes; "method": "lora" swaps the method).
SWITCH_LADDER: tuple[tuple[str, tuple[str, ...], dict[str, Any]], ...] = (
    ("as configured", (), {}),
    ("gradient checkpointing", ("model.gradient_checkpointing=true",), {"gradient_checkpointing": True}),
    ("8-bit AdamW", ("optimizer=adamw8bit",), {"optimizer": "AdamW8bit"}),
    ("gradient checkpointing + 8-bit AdamW", ("model.gradient_checkpointing=true", "optimizer=adamw8bit"),
     {"gradient_checkpointing": True, "optimizer": "AdamW8bit"}),
    ("LoRA", ("method=lora",), {"method": "lora"}),
    ("LoRA + gradient checkpointing", ("method=lora", "model.gradient_checkpointing=true"),
     {"method": "lora", "gradient_checkpointing": True}),
    ("LoRA + gradient checkpointing, T5 off", ("method=lora", "model.gradient_checkpointing=true", "model.t5=false"),
     {"method": "lora", "gradient_checkpointing": True, "t5": False}),
)


def default_lora() -> Any:
    """conf/method/lora.yaml's LoRA (rank 4 on the attention projections), for the ladder's LoRA rows."""
    from dreambench.methods import LoRA
    return LoRA(rank=4)


def switch_ladder(configs: dict[str, dict[str, Any]], method: Any, rungs=SWITCH_LADDER, **kw: Any
                  ) -> list[tuple[str, tuple[str, ...], MemoryEstimate]]:
    """`estimate` for the run as configured and for each rung of SWITCH_LADDER (the overrides that apply it);
    `kw` as for `estimate`. A rung that is already configured (e.g. checkpointing on) is skipped. `rungs`: a part
    of the ladder (plan_for, which has the configured estimate already, asks for the switches only)."""
    out = []
    for label, overrides, change in rungs:
        if change and all(kw.get(k) == v for k, v in change.items() if k != "method") and "method" not in change:
            continue
        if change.get("method") == "lora" and getattr(method, "name", "") == "lora":
            continue
        if "t5" in change and ("text_encoder_3" not in configs or not kw.get("t5", True)):
            continue  # only SD 3.5 can leave its T5 out
        m = default_lora() if change.get("method") == "lora" else method
        args = {**kw, **{k: v for k, v in change.items() if k != "method"}}
        out.append((label, overrides, estimate(configs, m, **args)))
    return out


def device_capacity(accelerator: str) -> tuple[str, int | None]:
    """(device name, total bytes) of the device a run will use; CPU memory is not checked (swap, other jobs)."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"cuda:0 ({props.name})", int(props.total_memory)
    return "cpu", None


def plan_for(cfg: Any, model_ref: str, method: Any, capacity: int | None = None) -> MemoryEstimate | None:
    """The estimate for a composed train config; raises UserError when it exceeds the device. `capacity`
    overrides the detected device memory (bytes; tests, or a share of a larger card)."""
    if not cfg.get("memory", {}).get("plan", True):
        return None
    try:
        configs = read_configs(model_ref, cfg.model.revision)
    except Exception as e:  # noqa: BLE001 - a planner must never stop a run it cannot plan
        log.warning("memory plan skipped: cannot read the model configs (%s)", e.__class__.__name__)
        return None
    device, detected = device_capacity(str(cfg.trainer.get("accelerator", "auto")))
    given = cfg.get("memory", {}).get("capacity_gb")
    cap = capacity if capacity is not None else (int(float(given) * GB) if given is not None else detected)
    precision = str(cfg.trainer.precision)
    on_gpu = device.startswith("cuda")
    frozen = resolve_frozen_dtype(cfg.model.get("frozen_dtype", "auto"), precision, on_gpu)
    opt = str(cfg.optimizer.get("_target_", "torch.optim.AdamW")).rsplit(".", 1)[-1]
    # The run's settings as estimate() takes them: for the estimate, and for the switches that would make it fit.
    kw = {"resolution": int(cfg.data.resolution), "batch_size": int(cfg.data.batch_size),
          "prior": float(cfg.prior.get("weight", 0.0)) > 0, "precision": precision,
          "gradient_checkpointing": bool(cfg.model.gradient_checkpointing), "optimizer": opt,
          "attention": str(cfg.model.get("attention", "sdpa")), "frozen_dtype": frozen, "device": device,
          "capacity": cap, "context": _method_context(cfg, model_ref, method), "ema": _ema_on_device(cfg),
          "shards": _shards(cfg), **_family_args(cfg)}
    try:
        est = estimate(configs, method, **kw)
    except Exception as e:  # noqa: BLE001 - e.g. an architecture whose forward the meta trace cannot run
        log.warning("memory plan skipped: %s: %s", e.__class__.__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    log.info(est.line())
    for note in est.notes:
        log.warning("memory plan: %s", note)
    if not est.fits and not est.exact:
        log.warning("memory plan: the upper bound exceeds %s's %s; not stopping on an upper bound", device, human(cap))
    elif not est.fits:
        # Which switches would make it fit, from the same planner (a few seconds of meta-device traces).
        try:
            ladder = switch_ladder(configs, method, SWITCH_LADDER[1:], **kw)
            fitting = [f"{' '.join(o)} (~{human(e.total)})" for _, o, e in ladder if e.fits]
        except Exception as e:  # noqa: BLE001 - the advice must not hide the error it advises on
            log.debug("memory plan: switch ladder failed (%s)", e)
            fitting = []
        advice = ("; it fits with " + ", or ".join(fitting[:3])) if fitting else (
            "; no single switch of model.gradient_checkpointing=true, optimizer=adamw8bit, method=lora makes it "
            "fit: lower data.resolution or use a larger card")
        raise UserError(
            f"estimated peak memory {human(est.total)} exceeds {device}'s {human(cap)} "
            f"(resolution {cfg.data.resolution}, batch {cfg.data.batch_size}, precision {precision}){advice} "
            f"(memory.plan=false skips this check)")
    return est


def _family_args(cfg: Any) -> dict[str, Any]:
    return {"t5": bool(cfg.model.get("t5", True)), "max_sequence_length": int(cfg.model.get("max_sequence_length") or 256)}


def _shards(cfg: Any) -> int:
    """trainer=fsdp: the ranks the trained state is split over (its data_parallel_size); otherwise 1."""
    from dreambench.parallel import uses_fsdp
    if not uses_fsdp(cfg):
        return 1
    n = cfg.trainer.strategy.get("data_parallel_size")
    return int(n) if isinstance(n, int) or str(n).isdigit() else 1


def _ema_on_device(cfg: Any) -> bool:
    from omegaconf import OmegaConf
    return bool(OmegaConf.select(cfg, "train.ema.enabled", default=False)) and \
        str(OmegaConf.select(cfg, "train.ema.device", default="same")) == "same"


def _method_context(cfg: Any, model_ref: str, method: Any) -> dict[str, Any]:
    """What a method's prepare may read besides the components: the tokenizer (a few hundred KB of files, no
    weights), the identifier as train() resolves it, and the run config."""
    from types import SimpleNamespace

    # param_groups may scale a learning rate by the trainer's accumulation and world size: counts don't care.
    trainer = SimpleNamespace(accumulate_grad_batches=int(cfg.trainer.get("accumulate_grad_batches", 1) or 1),
                              world_size=1, global_rank=0, max_steps=int(cfg.trainer.get("max_steps", 1)))
    ctx: dict[str, Any] = {"run_cfg": cfg, "trainer": trainer}
    try:
        from transformers import CLIPTokenizer

        from dreambench.data.identifier import resolve_identifier
        tok = CLIPTokenizer.from_pretrained(model_ref, subfolder="tokenizer", revision=cfg.model.get("revision"))
        ident = resolve_identifier(str(cfg.data.get("identifier", "sks")), tok, int(cfg.seed))
        ctx.update(tokenizer=tok, identifier=method.identifier_token(ident))
        if str(cfg.model.get("family") or "sd") == "sdxl":  # SDXL's second tokenizer (textual inversion adds to both)
            ctx["tokenizer_2"] = CLIPTokenizer.from_pretrained(model_ref, subfolder="tokenizer_2",
                                                               revision=cfg.model.get("revision"))
    except Exception as e:  # noqa: BLE001 - without it a method needing one is planned as an upper bound
        log.debug("memory plan: no tokenizer for the method (%s)", e.__class__.__name__)
    return ctx


def resolve_frozen_dtype(setting: Any, precision: str, on_gpu: bool) -> torch.dtype | None:
    """`model.frozen_dtype`: auto -> the autocast dtype on a GPU under mixed precision (frozen VAE and text
    encoder need no fp32 master copy), else None (left as loaded); or an explicit fp32 / bf16 / fp16."""
    s = str(setting).lower()
    if s in ("none", "null", "fp32", "float32"):
        return None if s in ("none", "null") else torch.float32
    if s == "auto":
        if on_gpu and "mixed" in precision:
            return torch.bfloat16 if "bf16" in precision else torch.float16
        return None
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if s not in table:
        raise ValueError(f"model.frozen_dtype={setting!r}: auto, fp32, bf16 or fp16")
    return table[s]
